"""``python -m device_agent run ...`` is ``edgefleet agent run ...``."""

import sys

from shared.cli import main

if __name__ == "__main__":
    sys.argv[1:1] = ["agent"]
    main()
