"""Publishing to the Hub and run checkpoints on the Hub, through huggingface_hub.

The ladder, in the spirit of timm's `models/_hub.py` and of transformers' Trainer (`push_to_hub`, `hub_strategy`):
    check_push_access        a repo id and a token, checked offline before any work
    push_folder              a local folder -> one commit to a Hub repo (every upload goes through it)
    push_to_hub              an exported backbone (or the full IBProjModel) of a run or model folder -> a Hub repo
    push_checkpoint          a run's latest checkpoint -> the repo's last-checkpoint/, with the run's records
    download_run_checkpoint  that checkpoint and records -> a local run folder that `train.py --resume` continues
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, get_token
from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError

from .arguments import check_repo_id
from .cards import REPO_ID_PLACEHOLDER, full_model_card
from .export import export_backbone
from .checkpoints import CHECKPOINT_PREFIX, checkpoint_step
from .runs import RunFolder
from .sources import is_exported_folder, is_ibproj_folder, load_source

logger = logging.getLogger(__name__)

# Checkpoints on the Hub, as transformers' Trainer with hub_strategy="checkpoint": the latest one in last-checkpoint/,
# the run's records (RunFolder.RECORDS) at the top, and a record of the checkpoint's local folder name (its step).
HUB_CHECKPOINT_FOLDER = "last-checkpoint"
HUB_CHECKPOINT_RECORD = "last_checkpoint.json"
RETRY_PUSH = "Local folders are unchanged; retry the push."


class PushError(RuntimeError):
    """The Hub refused or failed an upload (or the upload could not be prepared); nothing local was changed."""


def check_push_access(repo_id: str, flag: str = "--push-to-hub") -> str:
    """The token for pushing to `repo_id` (HF_TOKEN or the login cache); ValueError on a bad id or no token.

    Cheap and offline: commands call it before their work so a bad `flag` fails at once, not at the end.
    """
    try:
        check_repo_id(repo_id, flag)
    except ValueError as error:
        raise ValueError(f"invalid Hub repository id: {error}") from None
    token = get_token()
    if token is None:
        raise ValueError(f"{flag} needs a Hugging Face token: set HF_TOKEN or log in with `hf auth login`.")
    return token


@contextlib.contextmanager
def _push_errors(what: str, repo_id: str, endpoint: str, retry: str = RETRY_PUSH) -> Iterator[None]:
    """Any failure inside becomes a PushError naming the repo, the Hub and how to retry (the cause stays chained)."""
    try:
        yield
    except Exception as error:
        raise PushError(f"{what} to {repo_id!r} on {endpoint} failed: {error}. {retry}") from error


def push_folder(
    folder: Path,
    repo_id: str,
    *,
    commit_message: str,
    private: bool = False,
    revision: str | None = None,
    ignore_patterns: list[str] | None = None,
    overwrite_readme: bool = True,
    retry: str = RETRY_PUSH,
) -> str:
    """Create `repo_id` (and the branch `revision`) if missing and upload `folder` in one commit; returns its URL.

    Without `overwrite_readme`, a README.md on the Hub that differs from the folder's is kept (a warning says so).
    Any failure (a bad id, no token, the Hub) raises PushError, whose message ends with `retry`.
    """
    with _push_errors("push", repo_id, HfApi().endpoint, retry):
        api = HfApi(token=check_push_access(repo_id))  # the token travels only in the Authorization header
        repo = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        if revision not in (None, "main"):
            api.create_branch(repo, branch=revision, exist_ok=True)
        keep_readme = not overwrite_readme and _hub_readme_differs(api, repo, revision, folder / "README.md")
        ignored = [*(ignore_patterns or []), *(["README.md"] if keep_readme else [])]
        commit = api.upload_folder(repo_id=repo, folder_path=folder, revision=revision, commit_message=commit_message,
                                   ignore_patterns=ignored or None)
    if keep_readme:
        logger.warning(
            "kept the README.md of %s on the Hub: it differs from the generated model card (edited on the Hub?). "
            "Pass --overwrite-readme (overwrite_readme=True) to replace it.", repo_id,
        )
    return commit.commit_url


def push_to_hub(
    source: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    full_model: bool = False,
    overwrite_readme: bool = False,
) -> str:
    """Create `repo_id` and upload the exported backbone (or, with `full_model`, the whole IBProjModel) to it.

    `source` is an exported folder, a saved IBProjModel folder or a run folder (its backbone/ is exported first
    when absent). A README.md on the Hub that differs from the card is kept (the rest is uploaded, and a warning
    says so) unless `overwrite_readme`. The token comes from HF_TOKEN or the login cache and is only sent in the
    Authorization header. The upload is staged in a temporary copy, so local folders are never modified. Returns
    the commit URL. Bad local input raises ValueError / FileNotFoundError before any request; a failure on the
    Hub's side raises PushError.
    """
    check_push_access(repo_id)
    source = Path(source)
    if not source.is_dir():
        raise FileNotFoundError(f"source folder {str(source)!r} does not exist.")
    run = RunFolder(source)
    if not any(is_exported_folder(folder) or is_ibproj_folder(folder)
               for folder in (source, run.backbone_dir, run.model_dir)):
        load_source(source)  # raises the clear "no IBProjModel" error before any request

    with tempfile.TemporaryDirectory(prefix="hf-ibproj-push-") as staging:
        folder = _stage_upload(source, Path(staging) / "upload", repo_id, full_model)
        message = commit_message or ("Upload IBProjModel" if full_model else "Upload backbone exported by hf_ibproj")
        return push_folder(folder, repo_id, commit_message=message, private=private, revision=revision,
                           overwrite_readme=overwrite_readme)


def _hub_readme_differs(api: HfApi, repo_id: str, revision: str | None, readme: Path) -> bool:
    """Whether the repo has a README.md other than `readme` (which the upload would replace)."""
    if not readme.is_file():
        return False
    with tempfile.TemporaryDirectory(prefix="hf-ibproj-readme-") as cache:
        try:
            hub_readme = Path(api.hf_hub_download(repo_id, "README.md", revision=revision, cache_dir=cache))
        except EntryNotFoundError:
            return False
        return hub_readme.read_bytes() != readme.read_bytes()


def _stage_upload(source: Path, staging: Path, repo_id: str, full_model: bool) -> Path:
    """The folder to upload, in `staging`, with a card rendered for `repo_id`."""
    if full_model:
        loaded = load_source(source)
        # save_pretrained writes the weights and, through register_for_auto_class, the model's code + auto_map.
        loaded.model.save_pretrained(staging)
        if loaded.plot:
            shutil.copy2(loaded.plot, staging / RunFolder.PLOT)
        full_model_card(loaded, repo_id).save(staging / "README.md")
        return staging
    exported = source if is_exported_folder(source) else RunFolder(source).backbone_dir
    if is_exported_folder(exported):
        shutil.copytree(exported, staging)
        readme = staging / "README.md"
        if readme.is_file():
            readme.write_text(readme.read_text().replace(REPO_ID_PLACEHOLDER, repo_id))
        return staging
    export_backbone(source, staging)
    return staging


# --------------------------------------------------------------------------------------------------------------
# Checkpoints on the Hub (transformers Trainer's hub_strategy="checkpoint")
# --------------------------------------------------------------------------------------------------------------
def push_checkpoint(run_dir: str | Path, checkpoint_dir: str | Path, repo_id: str, *, private: bool = False) -> str:
    """Upload a run's checkpoint as the repo's last-checkpoint/, with the run's records, in one commit.

    `checkpoint_dir` is a checkpoint folder RUN/checkpoints/step_N written by checkpoints.save_checkpoint; it
    replaces last-checkpoint/ entirely, the run's records (RunFolder.RECORDS) go to the top of the repo and
    last_checkpoint.json records the folder's name and step. Files are read in place, never modified. Returns the
    commit URL; any failure (bad input, no token, the Hub) raises PushError, so a training loop catches one type.
    """
    with _push_errors("checkpoint push", repo_id, HfApi().endpoint):
        token = check_push_access(repo_id)
        run, checkpoint_dir = RunFolder(run_dir), Path(checkpoint_dir)
        step = checkpoint_step(checkpoint_dir)
        files = sorted(p for p in checkpoint_dir.rglob("*") if p.is_file()) if checkpoint_dir.is_dir() else []
        if step is None or not files:
            raise FileNotFoundError(
                f"{str(checkpoint_dir)!r} is not a checkpoint folder ({CHECKPOINT_PREFIX}N holding the files that "
                "checkpoints.save_checkpoint writes); pass one from RUN/checkpoints."
            )
        operations = [
            CommitOperationAdd(f"{HUB_CHECKPOINT_FOLDER}/{p.relative_to(checkpoint_dir).as_posix()}", str(p))
            for p in files
        ]
        # The records are small and may grow while the run goes on: send a snapshot of their bytes.
        operations += [
            CommitOperationAdd(name, (run.path / name).read_bytes())
            for name in RunFolder.RECORDS if (run.path / name).is_file()
        ]
        record = {"name": checkpoint_dir.name, "step": step}
        operations.append(CommitOperationAdd(HUB_CHECKPOINT_RECORD, json.dumps(record, indent=2).encode()))
        api = HfApi(token=token)
        repo = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        uploaded = {operation.path_in_repo for operation in operations}
        stale = [
            CommitOperationDelete(path) for path in api.list_repo_files(repo)
            if path.startswith(f"{HUB_CHECKPOINT_FOLDER}/") and path not in uploaded
        ]
        commit = api.create_commit(repo, operations=[*stale, *operations],
                                   commit_message=f"Checkpoint {checkpoint_dir.name}")
    return commit.commit_url


def download_run_checkpoint(repo_id: str, run_dir: str | Path) -> Path:
    """Fetch the checkpoint `push_checkpoint` left in `repo_id` into `run_dir`, so `train.py --resume` continues.

    Writes the run's records the repo has (RunFolder.RECORDS), then run_dir/checkpoints/step_N/ under its recorded
    name with one rename of a complete folder, so an interrupted download never leaves a partial checkpoint.
    Everything comes from one commit and is staged inside `run_dir` (no Hub cache is written). Returns the
    checkpoint folder. Raises FileNotFoundError when the repo or its checkpoint is missing, FileExistsError when
    `run_dir` already holds a checkpoint.
    """
    run = RunFolder(run_dir)
    existing = run.latest_checkpoint()
    if existing is not None:
        raise FileExistsError(
            f"{run.path} already holds checkpoint {existing.name}; resume from it with `train.py --output-dir "
            f"{run.path} --resume`, or download into another --output-dir."
        )
    api = HfApi()
    try:
        commit = api.model_info(repo_id).sha  # one commit for the record and the files
        has_checkpoint = HUB_CHECKPOINT_RECORD in api.list_repo_files(repo_id, revision=commit)
    except RepositoryNotFoundError:
        raise FileNotFoundError(
            f"Hub repository {repo_id!r} does not exist (or is private and no token is set: HF_TOKEN)."
        ) from None
    if not has_checkpoint:
        raise FileNotFoundError(
            f"Hub repository {repo_id!r} holds no checkpoint ({HUB_CHECKPOINT_RECORD} is missing): push one with "
            f"`train.py --push-to-hub {repo_id} --hub-strategy checkpoint`."
        )
    run.checkpoints_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".hub-download-", dir=run.path) as staging:
        api.snapshot_download(repo_id, revision=commit, local_dir=staging,
                              allow_patterns=[HUB_CHECKPOINT_RECORD, f"{HUB_CHECKPOINT_FOLDER}/*", *RunFolder.RECORDS])
        staging = Path(staging)
        name = json.loads((staging / HUB_CHECKPOINT_RECORD).read_text()).get("name", "")
        if Path(name).name != name or checkpoint_step(name) is None:  # the name becomes a local path: only step_N
            raise ValueError(f"{HUB_CHECKPOINT_RECORD} of {repo_id!r} names {name!r}, not a {CHECKPOINT_PREFIX}N folder.")
        if not (staging / HUB_CHECKPOINT_FOLDER).is_dir():
            raise FileNotFoundError(f"Hub repository {repo_id!r} records {name} but has no {HUB_CHECKPOINT_FOLDER}/.")
        for record in RunFolder.RECORDS:
            if (staging / record).is_file():
                os.replace(staging / record, run.path / record)
        target = run.checkpoints_dir / name
        os.replace(staging / HUB_CHECKPOINT_FOLDER, target)
    return target
