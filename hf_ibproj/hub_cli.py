"""`hf-ibproj export SRC OUT` (hf_ibproj.export) and `hf-ibproj push SRC --repo-id ID ...` (hf_ibproj.hub).

The commands import their modules when they run, so `hf-ibproj --help` does not load the model stack.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field

from .arguments import arguments_from_namespace


@dataclass(kw_only=True)
class PushArguments:
    """The flags of `hf-ibproj push` (the source folder is its positional argument)."""

    repo_id: str = field(metadata={"help": "Hub repository 'username/model-name' (created if missing)"})
    private: bool = field(default=False, metadata={"help": "create the repository as private"})
    revision: str | None = field(default=None, metadata={"help": "branch to commit to, created if missing "
                                                                 "(None: main)"})
    commit_message: str | None = field(default=None, metadata={"help": "commit message (None: one that says what "
                                                                        "was uploaded)"})
    full_model: bool = field(default=False, metadata={
        "help": "push the whole IBProjModel (encoder + projector, loads with trust_remote_code=True) to continue "
                "pretraining, instead of the exported encoder"})
    overwrite_readme: bool = field(default=False, metadata={
        "help": "replace a README.md on the Hub that differs from the generated card, instead of keeping it"})


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """`hf-ibproj export SRC OUT` and `hf-ibproj push SRC --repo-id ID ...`."""
    export = subparsers.add_parser("export", help="export the encoder as a timm / transformers Hub folder")
    export.add_argument("src", help="training run folder, IBProjModel folder or checkpoint folder")
    export.add_argument("out", help="output folder (absent, empty, or a previous export)")
    export.set_defaults(func=_export_command)

    push = subparsers.add_parser("push", dataclass_types=[PushArguments],
                                 help="upload an exported backbone (or the full model) to the Hub")
    push.add_argument("src", help="exported backbone folder, training run folder or IBProjModel folder")
    push.set_defaults(func=_push_command)


def _export_command(args: argparse.Namespace) -> int:
    from .export import export_backbone

    out = export_backbone(args.src, args.out)
    print(f"exported backbone to {out}")
    return 0


def _push_command(namespace: argparse.Namespace) -> int:
    from .hub import PushError, check_push_access, push_to_hub

    args = arguments_from_namespace(PushArguments, namespace)
    check_push_access(args.repo_id, flag="--repo-id")  # errors name this command's flag
    try:
        url = push_to_hub(
            namespace.src, args.repo_id, private=args.private, revision=args.revision,
            commit_message=args.commit_message, full_model=args.full_model, overwrite_readme=args.overwrite_readme,
        )
    except PushError as error:
        print(f"hf-ibproj push: error: {error}", file=sys.stderr)
        return 1
    print(f"pushed to {url}")
    return 0
