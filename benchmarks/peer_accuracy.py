"""Accuracy at the same wall-clock budget: train.py's default job against lightly's SimCLR recipe, side by side.

    pip install -e ".[bench]"                        # lightly is a benchmark-only dependency
    python benchmarks/peer_accuracy.py               # ~50 min on 2 CPU cores: 4 x 10 min of training, 4 evaluations
    python benchmarks/peer_accuracy.py --smoke       # seconds, for CI: tiny budgets, subsets and widths
    python benchmarks/peer_accuracy.py --dataset DATA --out OUT   # the same on another dataset of the kind
                                                     # (28 px grayscale, train / test: idx_to_dataset.py makes one)

One after the other, on one machine:
  (a) `python train.py --output-dir OUT/train_py --time-budget MINUTES`: the default job (the preset
      configs/fashion_mnist_cpu.yaml), whose budget holds its training AND its own final evaluation; its wall time
      runs from process start to exit;
  (b) lightly's SimCLR recipe (benchmarks/lightly_recipe.py, which says where each hyper-parameter comes from) for
      MINUTES of training alone (wall clock, epochs over the full training split, its cosine learning rate spread
      over the budget): at lightly's batch at width 32 (channels [32, 64, 128, 256]) and at the default job's width,
      and at the default job's batch and width, with the learning rate scaled to that batch by lightly's rule.
Then every backbone is scored twice on the same features (full train and test splits, each with the mean / std it
was trained with: train.py's from OUT/train_py/model, lightly's from the timm folders OUT/lightly_*/):
hf_ibproj.evaluation's linear probe and kNN, and scikit-learn's LogisticRegression on standardized features and
cosine kNN (`second_evaluator`), so the ranking is not our evaluator's alone. One table shows the four top-1 scores,
training and total wall time and img/s of each, then the default job's smallest lead over the lightly rows per score
and the default job's phases from its records, each non-training phase over 10% of the budget flagged.

Resumable: each finished side writes OUT/SIDE.json (and OUT/SIDE_eval.json once scored); a rerun with the same
options skips those, so an interrupted benchmark loses only the side it was running. Everything goes to
OUT/peer_accuracy.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import timm
import torch

from hf_ibproj import IBProjModel
from hf_ibproj.data import load_image_data
from hf_ibproj.evaluation import evaluate_features, extract_features
from hf_ibproj.precision import has_native_bf16
from hf_ibproj.runs import RunFolder, cpu_name, write_json
from hf_ibproj.train_config import DEFAULT_PRESET, TrainConfig, read_preset
from lightly_recipe import BATCH_SIZE as LIGHTLY_BATCH
from lightly_recipe import LightlySimCLR, in_fresh_process, preset_uses_bf16, require_lightly

ROOT = Path(__file__).resolve().parent.parent
REFERENCE_CHANNELS = [32, 64, 128, 256]  # lightly at "width 32", whatever the default job's width
LIGHTLY_BACKBONE = "resnet18_small"  # the small-stem ResNet-18 of docs/method.md section 6
LIGHTLY_WORKERS = 2
SKLEARN_MAX_ITER, SKLEARN_KNN_K = 1000, 20  # the second evaluator (second_evaluator)
SCORES = ("linear_top1", "knn_top1", "sklearn_linear_top1", "sklearn_knn_top1")
KNN_LEAD_TARGET = 1.0  # percentage points the default job should lead every lightly row by on kNN
PHASE_SHARE_LIMIT = 0.10  # a non-training phase above this share of the budget is a defect to fix or justify
SEED = 0
EVALUATION_PHASES = ("feature_extraction", "linear_probe", "knn")  # the keys of an evaluation's "seconds", in order
# --smoke: seconds-long budgets, tiny subsets, tiny widths (stem width >= 8: a 4-wide stem corrupts memory in
# torch 2.14's channels_last backward on the CPU), one torch thread everywhere
SMOKE_MINUTES, SMOKE_BATCH, SMOKE_LIGHTLY_BATCH, SMOKE_TRAIN, SMOKE_TEST, SMOKE_IMAGE_SIZE = 0.05, 32, 64, 512, 256, 16
SMOKE_REFERENCE_CHANNELS, SMOKE_JOB_CHANNELS = [8, 16, 32, 64], [8, 8, 8, 8]
SMOKE_TRAIN_PY_FLAGS = ["--max-samples", str(SMOKE_TRAIN), "--eval-max-samples", str(SMOKE_TEST),
                        "--image-size", str(SMOKE_IMAGE_SIZE),
                        "--batch-size", str(SMOKE_BATCH), "--knn-train-samples", "256", "--knn-eval-samples", "128",
                        "--tracker", "none", "--log-every", "5"]


@dataclasses.dataclass
class Settings:
    """What a result depends on; a rerun into the same --out must match the stored copy (OUT/settings.json)."""

    minutes: float
    smoke: bool
    dataset: str
    train_split: str
    eval_split: str
    channels: int
    image_size: int
    train_samples: int | None  # None: the full split
    test_samples: int | None
    lightly_workers: int
    lightly_bf16: bool
    train_py_flags: list[str]
    lightly_sides: dict[str, dict]  # side name -> {"backbone_kwargs": ..., "batch_size": ...}


def make_settings(minutes: float | None, smoke: bool, dataset: str | None = None) -> Settings:
    preset = TrainConfig(**read_preset(DEFAULT_PRESET))
    if preset.objective != "simclr":
        sys.exit(f"the default preset {DEFAULT_PRESET} trains {preset.objective}; this benchmark compares SimCLR "
                 "recipes")
    minutes = minutes if minutes is not None else (SMOKE_MINUTES if smoke else 10.0)
    if not minutes > 0:
        sys.exit(f"--minutes must be positive, got {minutes}")
    job_kwargs = {"in_chans": preset.channels, **(preset.backbone_kwargs or {})}
    reference = REFERENCE_CHANNELS
    dataset = dataset or preset.dataset
    flags = ["--time-budget", str(minutes)]
    if dataset != preset.dataset:
        flags += ["--dataset", dataset]
    if smoke:
        job_kwargs["channels"], reference = SMOKE_JOB_CHANNELS, SMOKE_REFERENCE_CHANNELS
        flags += ["--backbone-kwargs", json.dumps({**(preset.backbone_kwargs or {}), "channels": SMOKE_JOB_CHANNELS}),
                  *SMOKE_TRAIN_PY_FLAGS]
    lightly_batch = SMOKE_LIGHTLY_BATCH if smoke else LIGHTLY_BATCH  # lightly's own (lightly_recipe.py)
    job_batch = SMOKE_BATCH if smoke else preset.batch_size
    sides = {}  # lightly's batch at width 32 and at the job's width, and the job's batch at its width
    for kwargs, batch in (({**job_kwargs, "channels": reference}, lightly_batch), (job_kwargs, lightly_batch),
                          (job_kwargs, job_batch)):  # the same side twice runs once
        channels = "-".join(map(str, kwargs.get("channels", ["default"])))
        sides.setdefault(f"lightly_{channels}_batch{batch}", {"backbone_kwargs": kwargs, "batch_size": batch})
    return Settings(
        minutes=minutes, smoke=smoke, dataset=dataset, train_split=preset.train_split,
        eval_split=preset.eval_split, channels=preset.channels,
        image_size=SMOKE_IMAGE_SIZE if smoke else preset.image_size,
        train_samples=SMOKE_TRAIN if smoke else None, test_samples=SMOKE_TEST if smoke else None,
        lightly_workers=1 if smoke else LIGHTLY_WORKERS,
        lightly_bf16=preset_uses_bf16(preset), train_py_flags=flags, lightly_sides=sides,
    )


# --------------------------------------------------------------------------------------------- (a) train.py


def run_train_py(settings: Settings, out: Path) -> dict:
    """`python train.py` as its own process; its wall time (start to exit) and the figures of its records."""
    run_dir = out / "train_py"
    if run_dir.exists():  # an unfinished timed run cannot be continued without distorting its wall time
        print(f"  {run_dir} holds an unfinished run: starting it again")
        shutil.rmtree(run_dir)
    command, wall_time = timed_train_py(["--output-dir", str(run_dir), *settings.train_py_flags],
                                        out / "train_py.log",
                                        env={**os.environ, "OMP_NUM_THREADS": "1"} if settings.smoke else None)
    return {"command": command, **read_train_py_records(run_dir, wall_time)}


def timed_train_py(arguments: list[str], log: Path, env: dict | None = None) -> tuple[str, float]:
    """`python train.py ARGUMENTS` in its own process, its output to `log`: the command as a user types it and its
    wall time from start to exit. A failed run raises with the end of its log."""
    command = [sys.executable, str(ROOT / "train.py"), *arguments]
    print(f"  {' '.join(command[1:])}  (output: {log})", flush=True)
    started = time.time()
    with log.open("w") as stream:
        code = subprocess.run(command, cwd=ROOT, stdout=stream, stderr=subprocess.STDOUT, env=env).returncode
    wall_time = time.time() - started
    if code != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
        raise RuntimeError(f"train.py exited with {code}; the end of {log}:\n{tail}")
    return " ".join(["python", *command[1:]]), wall_time


def read_train_py_records(run_dir: Path, wall_time: float) -> dict:
    """Training time, steps, img/s, its own evaluation, label-free diagnostics and phases, from a finished run's
    records."""
    folder = RunFolder(run_dir)
    run_info, final, config = folder.read_info(), folder.read_final_eval(), folder.read_config()
    random_init = folder.read_random_init_eval()
    phases = job_phases(run_info, random_init["seconds"], final["trained"]["seconds"], wall_time)
    training_s = dict(phases)["training"]
    return {
        "wall_time_s": round(wall_time, 1),
        "training_s": round(training_s, 1), "steps": run_info["total_steps"],
        "epochs": round(run_info["total_steps"] / config["steps_per_epoch"], 2),
        "img_per_s": round(run_info["total_steps"] * config["global_batch_size"] / training_s, 1),
        "backbone_kwargs": config["backbone_kwargs"], "batch_size": config["global_batch_size"],
        "plan": run_info.get("plan"),
        "own_evaluation": {"linear_top1": final["linear_top1"], "knn_top1": final["knn_top1"]},
        "label_free": final["trained"].get("label_free"),  # RankMe, alignment, I(Z1;Z2), ... of the trained model
        "phases": [{"phase": name, "seconds": round(seconds, 1)} for name, seconds in phases],
    }


def job_phases(run_info: dict, random_init_phases: dict, final_phases: dict,
               wall_time: float) -> list[tuple[str, float]]:
    """(phase, seconds) of train.py's run from its records; the phases add up to its wall time.

    run_info["phases"] holds seconds since process start at the end of training, evaluation and export; the
    evaluations' own `seconds` (feature extraction, linear probe, kNN) split them further.
    """
    marks = run_info["phases"]
    training_start = marks["training_start_s"]
    random_init = sum(random_init_phases.values())
    final = sum(final_phases.values())
    phases = [("start-up and data loading", training_start - random_init), ("random-init evaluation", random_init),
              ("training", marks["training_end_s"] - training_start),
              ("saving the model and plot, untimed work",
               marks["evaluation_end_s"] - marks["training_end_s"] - final)]
    order = sorted(final_phases, key=lambda name: EVALUATION_PHASES.index(name) if name in EVALUATION_PHASES
                   else len(EVALUATION_PHASES))
    phases += [(f"final evaluation: {name.replace('_', ' ').replace('knn', 'kNN')}", final_phases[name])
               for name in order]
    phases += [("export", marks["export_end_s"] - marks["evaluation_end_s"]),
               ("records and exit", wall_time - marks["export_end_s"])]
    return phases


# --------------------------------------------------------------------------------------------- (b) lightly


def train_lightly(settings: Settings, side: dict, folder: Path) -> dict:
    """lightly's recipe at the side's width and batch for `settings.minutes` of training (wall clock); the backbone
    saved as a timm folder."""
    backbone_kwargs = side["backbone_kwargs"]
    started = time.time()
    data = load_image_data(settings.dataset, settings.train_split, channels=settings.channels,
                           image_size=settings.image_size, max_samples=settings.train_samples, seed=SEED)
    torch.manual_seed(SEED)
    recipe = LightlySimCLR(data, LIGHTLY_BACKBONE, backbone_kwargs, batch_size=side["batch_size"],
                           num_workers=settings.lightly_workers, bf16=settings.lightly_bf16)
    budget = settings.minutes * 60
    steps, loss = 0, float("nan")
    training_started = time.perf_counter()
    elapsed = 0.0
    while elapsed < budget:  # whole epochs over the split, the last one cut where the budget ends
        for view_a, view_b in recipe.loader:
            recipe.set_progress(elapsed / budget)
            loss = recipe.step(view_a, view_b).item()
            steps += 1
            elapsed = time.perf_counter() - training_started
            if elapsed >= budget:
                break
    if not math.isfinite(loss):
        raise RuntimeError(f"lightly's recipe diverged (loss {loss}) at step {steps}")
    save_timm_folder(recipe.backbone, folder, backbone_kwargs, recipe.mean, recipe.std, settings.image_size)
    return {
        "backbone": LIGHTLY_BACKBONE, "backbone_kwargs": backbone_kwargs, "mean": recipe.mean, "std": recipe.std,
        "bf16": settings.lightly_bf16, "batch_size": recipe.batch_size, "lr": recipe.lr,
        "training_s": round(elapsed, 1),
        "steps": steps, "epochs": round(steps / len(recipe.loader), 2),
        "img_per_s": round(steps * recipe.batch_size / elapsed, 1), "final_loss": round(loss, 4),
        "wall_time_s": round(time.time() - started, 1),
    }


def save_timm_folder(backbone: torch.nn.Module, folder: Path, backbone_kwargs: dict, mean: list[float],
                     std: list[float], image_size: int) -> None:
    """timm's save_for_hf into a temporary folder renamed into place: `timm.create_model('local-dir:FOLDER')`."""
    temporary = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    backbone.to(memory_format=torch.contiguous_format)  # safetensors stores contiguous tensors only
    data_config = {"mean": tuple(mean), "std": tuple(std), "input_size": (len(mean), image_size, image_size)}
    timm.models.save_for_hf(backbone, str(temporary), model_args=backbone_kwargs, safe_serialization=True,
                            data_config=data_config)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(temporary, folder)


# --------------------------------------------------------------------------------------------- scoring


def load_for_scoring(side: str, out: Path) -> tuple[torch.nn.Module, list[float], list[float]]:
    """The trained backbone of a side and the mean / std it was trained with."""
    if side == "train_py":
        model = IBProjModel.from_pretrained(RunFolder(out / "train_py").model_dir)
        return model.backbone, list(model.config.image_mean), list(model.config.image_std)
    backbone = timm.create_model(f"local-dir:{out / side}", pretrained=True)
    data_config = timm.data.resolve_data_config(model=backbone)
    return backbone, list(data_config["mean"]), list(data_config["std"])


def score(side: str, out: Path, splits) -> dict:
    """hf_ibproj.evaluation's linear probe and kNN, and the second evaluator's, on the same extracted features."""
    started = time.perf_counter()
    backbone, mean, std = load_for_scoring(side, out)
    train, test = splits
    features = [extract_features(backbone, split.images, mean, std, progress=True) for split in splits]
    result = evaluate_features(features[0], train.labels, features[1], test.labels, class_names=train.class_names,
                               seed=SEED)
    evaluation_s = time.perf_counter() - started  # what train.py's own evaluation does: comparable totals
    second = second_evaluator(features[0], train.labels, features[1], test.labels)
    return {**result, **second, "mean": mean, "std": std, "evaluation_s": round(evaluation_s, 1),
            "second_evaluator_s": round(time.perf_counter() - started - evaluation_s, 1)}


def second_evaluator(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                     test_labels: torch.Tensor) -> dict[str, float]:
    """Top-1 (percent) by scikit-learn, so the ranking does not rest on hf_ibproj.evaluation alone: its
    LogisticRegression (L-BFGS, default C = 1) on standardized features and its cosine kNN (k = 20, majority)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x_train, x_test = train_features.float().numpy(), test_features.float().numpy()
    y_train, y_test = train_labels.numpy(), test_labels.numpy()
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=SKLEARN_MAX_ITER)).fit(x_train, y_train)
    knn = KNeighborsClassifier(SKLEARN_KNN_K, metric="cosine", algorithm="brute").fit(x_train, y_train)
    return {"sklearn_linear_top1": 100 * probe.score(x_test, y_test),
            "sklearn_knn_top1": 100 * knn.score(x_test, y_test)}


# --------------------------------------------------------------------------------------------- report


def table_rows(results: dict[str, dict], scores: dict[str, dict]) -> list[dict]:
    rows = []
    for side, result in results.items():
        channels = result["backbone_kwargs"].get("channels", "default")
        shape = f"channels {channels}, batch {result['batch_size']}"
        if side == "train_py":
            name, total = f"train.py default job, {shape}", result["wall_time_s"]
        else:  # its training process (data loading, training, saving) and its evaluation
            name, total = f"lightly SimCLR, {shape}", result["wall_time_s"] + scores[side]["evaluation_s"]
        rows.append({"side": side, "model": name, **{key: scores[side][key] for key in SCORES},
                     "training_s": result["training_s"], "total_s": round(total, 1), "img_per_s": result["img_per_s"],
                     "steps": result["steps"], "epochs": result["epochs"]})
    return rows


def leads(rows: list[dict]) -> dict[str, float]:
    """Per score, the default job's (first row's) smallest lead over the lightly rows, in percentage points."""
    return {key: round(min(rows[0][key] - row[key] for row in rows[1:]), 2) for key in SCORES}


def format_rows(rows: list[dict]) -> str:
    columns = [("linear top-1", "linear_top1", "{:.2f}"), ("kNN top-1", "knn_top1", "{:.2f}"),
               ("sk linear", "sklearn_linear_top1", "{:.2f}"), ("sk kNN", "sklearn_knn_top1", "{:.2f}"),
               ("training s", "training_s", "{:.1f}"), ("total s", "total_s", "{:.1f}"),
               ("img/s", "img_per_s", "{:.1f}"), ("steps", "steps", "{}"), ("epochs", "epochs", "{:.2f}")]
    width = max(len(row["model"]) for row in rows)
    lines = ["model".ljust(width) + "".join(f"  {title:>12}" for title, _, _ in columns)]
    lines.append("-" * len(lines[0]))
    for row in rows:
        lines.append(row["model"].ljust(width) + "".join(f"  {fmt.format(row[key]):>12}" for _, key, fmt in columns))
    return "\n".join(lines)


def format_phases(phases: list[dict], budget_s: float) -> tuple[str, list[str]]:
    """The phase table and the phases (not training) over PHASE_SHARE_LIMIT of the budget."""
    over = [p["phase"] for p in phases if p["phase"] != "training" and p["seconds"] > PHASE_SHARE_LIMIT * budget_s]
    width = max(len(p["phase"]) for p in phases)
    lines = []
    for p in phases:
        flag = f"  <- over {PHASE_SHARE_LIMIT:.0%} of the budget: fix it or justify it" if p["phase"] in over else ""
        lines.append(f"  {p['phase'].ljust(width)}  {p['seconds']:8.1f} s  {100 * p['seconds'] / budget_s:5.1f}%{flag}")
    return "\n".join(lines), over


def machine() -> dict:
    return {"cpu": cpu_name(), "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "native_bf16": has_native_bf16(torch.device("cpu")),
            "torch": torch.__version__, "load_average": os.getloadavg()}


def train_sides(settings: Settings, out: Path) -> dict[str, dict]:
    """Each side's training record: OUT/SIDE.json, made now unless a previous invocation finished it."""
    results = {}
    for side in ["train_py", *settings.lightly_sides]:
        path = out / f"{side}.json"
        if path.is_file():
            print(f"{side}: skipped (done: {path})")
        else:
            print(f"{side}: {settings.minutes:g} min {'whole run' if side == 'train_py' else 'of training'}",
                  flush=True)
            if side == "train_py":
                result = run_train_py(settings, out)
            else:
                result = in_fresh_process(train_lightly, settings, settings.lightly_sides[side], out / side)
            write_json(path, result)
            print(f"{side}: {result['steps']} steps in {result['training_s']:.1f} s of training, "
                  f"{result['img_per_s']:.1f} img/s", flush=True)
        results[side] = json.loads(path.read_text())
    return results


def score_sides(settings: Settings, out: Path, sides: list[str]) -> dict[str, dict]:
    """Each side's scores: OUT/SIDE_eval.json, made now unless a previous invocation finished it."""
    scores, splits = {}, None
    for side in sides:
        path = out / f"{side}_eval.json"
        if path.is_file():
            print(f"{side} evaluation: skipped (done: {path})")
        else:
            if splits is None:  # loaded once, for every backbone still to score
                splits = [load_image_data(settings.dataset, split, channels=settings.channels,
                                          image_size=settings.image_size, max_samples=samples, seed=SEED)
                          for split, samples in ((settings.train_split, settings.train_samples),
                                                 (settings.eval_split, settings.test_samples))]
            print(f"{side} evaluation: {len(splits[0])} train / {len(splits[1])} {settings.eval_split} images",
                  flush=True)
            write_json(path, score(side, out, splits))
        scores[side] = json.loads(path.read_text())
    return scores


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=None,
                        help=f"budget of each side: train.py's whole run, lightly's training (default: 10; "
                             f"{SMOKE_MINUTES} with --smoke)")
    parser.add_argument("--smoke", action="store_true",
                        help=f"seconds: {SMOKE_TRAIN} training / {SMOKE_TEST} test images of {SMOKE_IMAGE_SIZE} px, "
                             "tiny widths, for CI")
    parser.add_argument("--dataset", default=None,
                        help="another dataset of the preset's kind (the preset's channels, image size and splits: a "
                             "Hub id, an image folder or a save_to_disk folder, e.g. from idx_to_dataset.py), for "
                             "every side (default: the preset's)")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder of the runs and results (default: benchmarks/out/peer_accuracy, "
                             "or benchmarks/out/peer_accuracy_smoke with --smoke)")
    args = parser.parse_args(argv)
    require_lightly()
    settings = make_settings(args.minutes, args.smoke, args.dataset)
    if args.smoke:
        torch.set_num_threads(1)  # tiny tensors: a second thread only adds wake-ups (10-50x slower on a busy CPU)
    out = args.out or ROOT / "benchmarks" / "out" / ("peer_accuracy_smoke" if args.smoke else "peer_accuracy")
    out.mkdir(parents=True, exist_ok=True)
    stored, current = out / "settings.json", dataclasses.asdict(settings)
    if stored.is_file() and json.loads(stored.read_text()) != json.loads(json.dumps(current)):
        parser.error(f"{out} holds results of other options ({stored}); rerun with those, or pass another --out")
    write_json(stored, current)
    started = time.time()

    results = train_sides(settings, out)
    scores = score_sides(settings, out, list(results))
    rows = table_rows(results, scores)
    job = results["train_py"]
    phase_text, over = format_phases(job["phases"], settings.minutes * 60)
    lead = leads(rows)
    ahead = all(value > 0 for value in lead.values())
    knn_target = min(lead["knn_top1"], lead["sklearn_knn_top1"]) >= KNN_LEAD_TARGET
    print(f"\n{settings.dataset}: {settings.minutes:g} min each, scored on the same features by hf_ibproj.evaluation "
          f"(linear, kNN) and by scikit-learn (sk linear, sk kNN: second_evaluator) "
          f"({scores['train_py']['num_train']} train / {scores['train_py']['num_test']} {settings.eval_split} images)")
    print(format_rows(rows))
    print("total s: train.py from process start to exit (its own evaluation included); lightly: its training "
          "process (data loading, training, saving) plus its evaluation here")
    print(f"train.py's own final evaluation: linear {job['own_evaluation']['linear_top1']:.2f}, "
          f"kNN {job['own_evaluation']['knn_top1']:.2f}")
    print("the default job's smallest lead over the lightly rows (pp): "
          + ", ".join(f"{key.removesuffix('_top1').replace('_', ' ')} {value:+.2f}" for key, value in lead.items()))
    print(f"default job ahead of every lightly row on every score: {'yes' if ahead else 'NO'}; "
          f"by {KNN_LEAD_TARGET:g} pp or more on kNN (both evaluators): {'yes' if knn_target else 'NO'}")
    print(f"\nthe default job's phases (budget {settings.minutes * 60:.0f} s, wall time {job['wall_time_s']:.1f} s):")
    print(phase_text)

    report = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
              "command": " ".join(["python", "benchmarks/peer_accuracy.py",
                                   *(argv if argv is not None else sys.argv[1:])]),
              "settings": current, "rows": rows, "default_job_leads": lead, "default_job_ahead": ahead,
              "knn_lead_target_met": knn_target,
              "default_job_phases": job["phases"], "phases_over_limit": over, "train_py": job,
              "lightly": {side: results[side] for side in settings.lightly_sides}, "scores": scores,
              "this_invocation_s": round(time.time() - started, 1)}
    write_json(out / "peer_accuracy.json", report)
    print(f"\nresults: {out / 'peer_accuracy.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
