"""`hf-ibproj` console script. Each concern registers its own sub-commands (`register_cli(subparsers)`)."""

from __future__ import annotations

import argparse
import importlib
import sys

# Modules that contribute sub-commands, each through a `register_cli(subparsers)` function.
_COMMAND_MODULES = ("hf_ibproj.hub", "hf_ibproj.evaluation")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-ibproj", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in _COMMAND_MODULES:
        module = importlib.import_module(name)
        module.register_cli(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as error:
        print(f"hf-ibproj {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
