"""`metering-operator emulator`: run the local AWS Marketplace Metering Service + STS emulator.

Prints ``emulator listening on http://HOST:PORT`` once it accepts connections (port 0 picks a
free port), then serves until SIGTERM/SIGINT. Without --config it starts empty but valid.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", type=Path, default=None, help="YAML configuration file (see docs/emulator.md)"
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="port to bind; 0 picks a free one (default: 0)")
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=Path(".emulator-state"),
        help="directory for the SQLite state and the product key pairs (default: ./.emulator-state)",
    )


def main(args: argparse.Namespace) -> int:
    from metering_operator.emulator.server import run

    result: int = run(args.config, args.state_dir, args.host, args.port)
    return result
