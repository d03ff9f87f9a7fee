"""The `metering-operator` console script.

Each subcommand lives in its own module exposing ``configure_parser(parser)`` and
``main(args) -> int``; modules are imported lazily so that, for example, `verify` does not
pay for importing kopf and the Kubernetes client.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from metering_operator import __version__

# subcommand -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "run": ("metering_operator.commands.run", "run the operator (kopf) against the current cluster"),
    "emulator": (
        "metering_operator.commands.emulator",
        "run the local AWS Marketplace Metering Service + STS emulator",
    ),
    "verify": (
        "metering_operator.commands.verify",
        "verify a RegisterUsage signature JWT for a product, key and nonce",
    ),
    "manifests": (
        "metering_operator.commands.manifests",
        "write the CRD and sample MeteredProduct generated from the models",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="metering-operator",
        description="AWS Marketplace metering operator for Kubernetes.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        module = importlib.import_module(module_name)
        module.configure_parser(sub)
        sub.set_defaults(_module=module_name)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    module = importlib.import_module(args._module)
    result: int = module.main(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
