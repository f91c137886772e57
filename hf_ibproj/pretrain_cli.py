"""train.py's command line: a preset plus flags (or, with --resume, the run's stored settings), then `pretrain`.

The flags are parsed before `hf_ibproj.pretraining` (and its model and data stack) is imported, so `--help` and a
mistyped flag answer at once.
"""

from __future__ import annotations

import sys

from .progress import plain_logs_off_terminal
from .train_config import TrainConfig, early_arguments, parse_train_config, read_preset


def main(argv: list[str] | None = None, started_at: float | None = None) -> int:
    """Run train.py with `argv` (default: sys.argv[1:]); exit status 1 when training diverged."""
    early = early_arguments(argv)
    if early.resume and early.push_to_hub and early.output_dir:
        from .pretraining import fetch_run_from_hub

        fetch_run_from_hub(early.output_dir, early.push_to_hub, early.ddp_timeout)
    config, args = parse_train_config(argv)
    plain_logs_off_terminal()
    from .pretraining import NonFiniteLossError, ProcessGroupTimeoutError, pretrain, process_state

    state = process_state(config.ddp_timeout)
    if not args.resume and state.is_main_process:
        preset = {**TrainConfig().to_dict(), **read_preset(args.config)}  # not validated alone: flags may fix it
        changed = {k: v for k, v in config.to_dict().items() if v != preset[k] and k != "mixed_precision"}
        print(f"preset {args.config}, changed: {changed or 'nothing'}")
    try:
        pretrain(config, resume=args.resume, started_at=started_at)
    except NonFiniteLossError as error:
        if state.is_main_process:
            print(f"train.py: error: {error}", file=sys.stderr)
        return 1
    except ProcessGroupTimeoutError as error:  # raised by the processes that waited, so not only by the main one
        print(f"train.py: error: {error}", file=sys.stderr)
        return 1
    finally:
        state.destroy_process_group()
    return 0
