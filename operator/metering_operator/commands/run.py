"""`metering-operator run`: not implemented yet (owned by issue #4)."""

from __future__ import annotations

import argparse
import sys


def configure_parser(parser: argparse.ArgumentParser) -> None:
    del parser


def main(args: argparse.Namespace) -> int:
    del args
    print("metering-operator run: not implemented yet (issue #4)", file=sys.stderr)
    return 2
