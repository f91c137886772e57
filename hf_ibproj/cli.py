"""`hf-ibproj` console script. Each command registers its own sub-command (`register_cli(subparsers)`)."""

from __future__ import annotations

import argparse
import importlib
import sys

from .arguments import ArgumentParser
from .progress import plain_logs_off_terminal

# Modules that contribute sub-commands, each through a `register_cli(subparsers)` function.
_COMMAND_MODULES = ("hf_ibproj.hub_cli", "hf_ibproj.evaluate_cli", "hf_ibproj.finetune_cli")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-ibproj", description=__doc__)
    # Sub-commands are HfArgumentParsers: one built from dataclasses passes `dataclass_types=[...]` to add_parser;
    # one that adds plain argparse arguments gets an HfArgumentParser without dataclasses (a plain parser that
    # shows defaults in --help).
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)
    for name in _COMMAND_MODULES:
        module = importlib.import_module(name)
        module.register_cli(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    plain_logs_off_terminal()
    try:
        return int(args.func(args) or 0)
    except (ValueError, OSError) as error:  # bad input: a flag's value, a missing or occupied folder, a bad reference
        print(f"hf-ibproj {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
