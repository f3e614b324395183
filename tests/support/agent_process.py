"""A real device agent (``python -m device_agent run``) as a subprocess, simulated sensor at 100 Hz
in 50-sample windows, with none of the test process's ``EDGEFLEET_*`` variables."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def start_agent_process(
    device_id: str, broker_url: str, data_dir: Path, log_path: Path
) -> subprocess.Popen[bytes]:
    with log_path.open("ab") as log:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "device_agent",
                "run",
                "--device-id",
                device_id,
                "--broker",
                broker_url,
                "--data-dir",
                str(data_dir),
                "--rate",
                "100",
                "--window",
                "50",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_")},
        )
