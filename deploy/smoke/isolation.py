"""Network isolation probe of the compose topology (service ``isolation`` of docker-compose.smoke.yml),
run on the devices' network: every ``--reach`` HOST:PORT must accept a TCP connection (retried for
``--timeout`` seconds: the broker may still be starting) and every ``--unreachable`` HOST:PORT must
not (its name does not resolve there, or nothing answers). Exit 0 when both hold, else 1 naming what
was wrong. Standard library only."""

from __future__ import annotations

import argparse
import socket
import sys
import time


def connects(target: str, timeout_s: float = 3.0) -> str | None:
    """None when ``target`` (HOST:PORT) accepts a TCP connection, else why not."""
    host, _, port = target.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            return None
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"


def main(argv: list[str]) -> int:
    """Check every target; the exit status (0: isolated as expected)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reach", nargs="*", default=[], help="HOST:PORT that must answer")
    parser.add_argument("--unreachable", nargs="*", default=[], help="HOST:PORT that must not")
    parser.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args(argv)
    problems: list[str] = []
    deadline = time.monotonic() + args.timeout
    for target in args.reach:
        while (why := connects(target)) is not None and time.monotonic() < deadline:
            time.sleep(1.0)
        if why is not None:
            problems.append(f"{target} should answer and does not ({why})")
        else:
            print(f"isolation: {target} answers, as it should", flush=True)
    for target in args.unreachable:
        why = connects(target)
        if why is None:
            problems.append(f"{target} answers on this network and should not")
        else:
            print(f"isolation: {target} unreachable, as it should be ({why})", flush=True)
    for problem in problems:
        print(f"isolation: FAIL: {problem}", file=sys.stderr, flush=True)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
