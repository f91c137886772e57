"""Projector bottlenecks compared (docs/method.md sections 3 and 7) on Fashion-MNIST at a budget where training matters.

    python benchmarks/compare_bottlenecks.py                # the whole protocol (2 runs side by side, resumable)
    python benchmarks/compare_bottlenecks.py --report-only  # tables and plots from the committed run summaries
    python benchmarks/compare_bottlenecks.py --smoke        # tiny data and steps in a temp dir (CI)

Protocol (no tuning on the test split):
- Data: the Fashion-MNIST training split is carved once (seeded, class-stratified) into 50,000 pretraining images
  and a 10,000-image validation split (OUT/data, a save_to_disk folder). Every run pretrains with train.py on the
  50,000 (main() in a forked process per run: Accelerate keeps global state); train.py's own monitors see only
  the validation split.
- Evaluation, by this script, of the frozen backbone of each run: the linear probe and kNN of hf_ibproj.evaluation,
  fit on a fixed stratified 10,000-image subset of the 50,000, scored on the validation split (search runs) or on
  the full 10,000-image test split (final runs: the test split is scored once per final run, and nothing is chosen
  from it). Label-free diagnostics (hf_ibproj.diagnostics) on a fixed 2,000-image subset of the validation split,
  with alignment pairs from one fixed seeded SimCLR augmentation for every run, so every run sees the same pairs.
- Stage 1, search (seeds 100, 101, ...): each bottleneck's own hyper-parameter, per objective, on the validation
  split: the values of SEARCH, --search-seeds seeds for the three sweeps of the issue (SimCLR MI weight, SimCLR
  quantizer levels, Barlow Twins sparse k), --screen-seeds for the others; the standard projector with every
  search seed. The chosen value has the highest mean validation linear top-1; a value with a diverged run (a
  non-finite loss: recorded as such, never redone) is not chosen. The learning rate is not searched: the
  preset's (per objective) for every projector, so standard and bottlenecks get the same optimizer.
- Stage 2, final (seeds 0, 1, 2; fresh seeds, so no selected run is reported): standard, MI penalty, FSQ, top-k
  sparse and all three (each with its chosen value), scored once on the test split; and the untrained backbone of
  each seed under the same evaluation.

Outputs: one small JSON per finished run in RESULTS (committed: tables and plots regenerate with --report-only on
any machine); run folders in OUT (not committed); PLOTS/compare_bottlenecks.md (mean +- std, paired differences to
the standard projector with 95% t-intervals and a verdict per cell, the sweeps, the Spearman correlation of every
label-free diagnostic with linear top-1, and which projector each diagnostic would have picked) and the PNGs
compare_sweeps.png (the inverted U, or not), compare_diagnostics.png and compare_accuracy_vs_mi.png.
Resumable: a run whose summary exists is not redone; a trained run without one is only evaluated; a run cut short
with a checkpoint continues with train.py --resume; one cut short before its first checkpoint starts afresh.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import datasets  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from scipy import stats  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
from hf_ibproj import IBProjConfig, IBProjModel  # noqa: E402
from hf_ibproj.augmentation import TwoViewAugmentation  # noqa: E402
from hf_ibproj.data import ImageData, load_image_data, stratified_indices  # noqa: E402
from hf_ibproj.diagnostics import label_free_diagnostics  # noqa: E402
from hf_ibproj.evaluation import evaluate_backbone  # noqa: E402
from hf_ibproj.pretraining import NonFiniteLossError, pretrain  # noqa: E402
from hf_ibproj.checkpoints import latest_checkpoint  # noqa: E402
from hf_ibproj.runs import RunFolder, write_json  # noqa: E402
from hf_ibproj.train_config import parse_train_config  # noqa: E402

# Every run: train.py flags on top of configs/fashion_mnist_cpu.yaml. Width-8 small-stem ResNet-18 (64-d
# features), 28 px, batch 256, MAX_STEPS LARS steps (about half an epoch of the 50,000 pretraining images), fp32
# (this CPU has no native bf16; bf16 autocast measured 2x slower than fp32 here). train.py's own final evaluation
# is off: this script evaluates (see the protocol above).
# Sized by one SimCLR standard run of 300 steps (seeds 0 and 1 side by side, 1 thread each; validation linear
# top-1, probe on the 10,000-image subset): 75.9 at step 50, 75.4 at 100, 77.6 at 150, 79.3 at 200, 79.9 / 79.5
# at 300, against 60.7 / 51.0 for the untrained backbones of seeds 0 / 1. At 100 steps the standard projector is
# already >= 14 pp above the better untrained seed (a lower bound: those checkpoints were not at the end of their
# cosine schedule). Measured on the whole protocol (RESULTS.md, 2026-12-01): 92 runs in 82 min on 2 cores, and the
# standard projector 17-21 pp above the untrained backbones on the test split.
MAX_STEPS = 100
BUDGET = {
    "backbone-kwargs": "{channels: [8, 16, 32, 64]}",
    "batch-size": "256",
    "max-steps": str(MAX_STEPS),
    "warmup-epochs": "0.1",
    "mixed-precision": "no",
    "train-split": "train",
    "eval-split": "validation",
    "eval-max-samples": "1000",
    "knn-train-samples": "2000",
    "knn-eval-samples": "1000",
    "log-every": "10",
    "diagnostics-every": "10",
    "checkpoint-every": "50",
    "tracker": "none",
    "final-eval": "false",
    "export-backbone": "false",
}
SMOKE_BUDGET = {**BUDGET, "backbone-kwargs": "{channels: [8, 8, 16, 16]}", "batch-size": "32", "max-steps": "2",
                "warmup-epochs": "0",
                "eval-max-samples": "64", "knn-train-samples": "64", "knn-eval-samples": "64", "log-every": "1",
                "diagnostics-every": "1"}


@dataclass(frozen=True)
class Sizes:
    """How the data is carved and evaluated."""

    validation: int = 10000  # carved from the training split
    probe_train: int = 10000  # of the pretraining images: the probe's and kNN's training set
    diagnostics: int = 2000  # of the validation split: the label-free diagnostics' images
    test: int | None = None  # None: the full test split
    diagnostics_batch: int = 256  # chunk of the batch-level diagnostics (the training batch)


SMOKE_SIZES = Sizes(validation=128, probe_train=128, diagnostics=64, test=128, diagnostics_batch=32)
SMOKE_TRAIN_SAMPLES = 512  # smoke only: the carved training split is cut to this many images

# Per-objective projector settings (docs/method.md sections 3-4). Barlow Twins at projector width 1024 (paper 2048: at
# this backbone width the 2048^2 layers cost more than the whole encoder) and LARS lr 0.9 (the paper's ratio
# 0.3 / 0.4 to SimCLR's preset lr 1.2). The sparse block: SimCLR replaces the MLP by it (2048 latents), Barlow
# Twins puts it after the first [Linear-BN-ReLU] block (1024 latents), as the released code does.
OBJECTIVES = {
    "simclr": {"base": {}, "sparse": {"sparse-latent-dim": "2048"}},
    "barlow_twins": {
        "base": {"lr": "0.9", "projector-hidden-dims": "[1024, 1024]", "projector-out-dim": "1024"},
        "sparse": {"sparse-latent-dim": "1024", "projector-hidden-dims": "[1024]", "projector-out-dim": "0"},
    },
}
BOTTLENECKS = {"mi_weight": "mi", "quantize_levels": "quantized", "sparse_topk": "sparse"}  # -> final setting
# The values searched on the validation split; "sweep" searches use --search-seeds seeds, "screen" --screen-seeds;
# a single value is taken as it is, without a search.
# Paper values: lambda 1e-4 (CIFAR) / 1e-2 (ImageNet-100); L = 30 (SimCLR) / 3 (Barlow Twins); k = 0.001 d_latent
# (SimCLR: 2 of 2048, too few here) / 0.2 d_latent (Barlow Twins: 205 of 1024).
SEARCH = {
    "simclr": {"mi_weight": (("1e-4", "1e-3", "1e-2", "1e-1"), "sweep"),
               "quantize_levels": (("3", "5", "10", "30", "100"), "sweep"),
               "sparse_topk": (("4", "16", "64", "256"), "screen")},
    "barlow_twins": {"mi_weight": (("1e-4", "1e-3", "1e-2"), "screen"),
                     "quantize_levels": (("3", "5", "10", "30"), "screen"),
                     "sparse_topk": (("51", "102", "205", "410", "819"), "sweep")},
}
SMOKE_SEARCH = {"simclr": {"mi_weight": (("1e-3", "1e-1"), "sweep"), "quantize_levels": (("30",), "screen"),
                           "sparse_topk": (("16",), "screen")},
                "barlow_twins": {"mi_weight": (("1e-3",), "screen"), "quantize_levels": (("3",), "screen"),
                                 "sparse_topk": (("205",), "screen")}}
SETTINGS = ("standard", "mi", "quantized", "sparse", "combined")
SMOKE_SETTINGS = ("standard", "combined")
SEARCH_SEED_START = 100
# Label-free diagnostics: the direction in which each should mean a better encoder (for "which would have picked").
DIAGNOSTICS = {"rankme": +1, "alignment": -1, "uniformity": -1, "I(Z1;Z2)": -1, "H(Z1)": +1, "I(Z1;R)": +1,
               "lower_bound": +1, "upper_bound": +1}


@dataclass
class RunSpec:
    """One run: its name, stage (search / final / untrained), objective, seed, train.py flags and what it stands for."""

    name: str
    stage: str
    objective: str
    seed: int
    flags: dict[str, str] = field(default_factory=dict)
    label: str = "standard"  # search: "standard" or "<bottleneck>=<value>"; final: the setting


def bottleneck_flags(objective: str, bottleneck: str, value: str) -> dict[str, str]:
    if bottleneck == "sparse_topk":
        return {**OBJECTIVES[objective]["sparse"], "sparse-topk": value}
    return {bottleneck.replace("_", "-"): value}


def run_name(stage: str, objective: str, flags: dict[str, str], seed: int) -> str:
    parts = [stage, objective] + [f"{k}={v}" for k, v in sorted(flags.items()) if k != "objective"] + [f"seed{seed}"]
    return "-".join(parts).replace(" ", "").replace("[", "").replace("]", "").replace(",", "_")


def make_run(stage: str, objective: str, seed: int, flags: dict[str, str], label: str) -> RunSpec:
    flags = {"objective": objective, **OBJECTIVES[objective]["base"], **flags}
    return RunSpec(run_name(stage, objective, flags, seed), stage, objective, seed, flags, label)


def search_runs(search: dict, search_seeds: int, screen_seeds: int) -> list[RunSpec]:
    """Stage 1, seed by seed so that a partial search covers every value; the standard projector is every sweep's
    no-bottleneck point."""
    seeds = range(SEARCH_SEED_START, SEARCH_SEED_START + search_seeds)
    runs = []
    for i, seed in enumerate(seeds):
        for objective, bottlenecks in search.items():
            searched = {b: (values, kind) for b, (values, kind) in bottlenecks.items() if len(values) > 1}
            if searched:
                runs.append(make_run("search", objective, seed, {}, "standard"))
            for bottleneck, (values, kind) in searched.items():
                if kind == "sweep" or i < screen_seeds:
                    runs += [make_run("search", objective, seed, bottleneck_flags(objective, bottleneck, v),
                                      f"{bottleneck}={v}") for v in values]
    return runs


def choose(search: dict, planned: list[RunSpec], summaries: list[dict]) -> dict[str, dict[str, str]]:
    """objective -> bottleneck -> the value with the highest mean validation linear top-1 (ties: listed first),
    for the objectives whose planned search runs have all finished (a partial search chooses nothing)."""
    finished = {s["name"] for s in summaries}
    chosen: dict[str, dict[str, str]] = {}
    for objective, bottlenecks in search.items():
        if any(spec.name not in finished for spec in planned if spec.objective == objective):
            continue
        chosen[objective] = {}
        for bottleneck, (values, _) in bottlenecks.items():
            means = {v: _mean_of(summaries, "search", objective, f"{bottleneck}={v}") for v in values}
            means = {v: m for v, m in means.items() if m is not None} if len(values) > 1 else {values[0]: 0.0}
            if not means:  # every value diverged: nothing to compare this objective's bottlenecks with
                del chosen[objective]
                break
            chosen[objective][bottleneck] = max(means, key=means.get)
    return chosen


def final_runs(chosen: dict, seeds: int, settings: tuple[str, ...] = SETTINGS) -> list[RunSpec]:
    """Stage 2 for every objective with chosen values, plus one untrained backbone per seed."""
    runs = []
    for seed in range(seeds):
        runs.append(RunSpec(f"untrained-seed{seed}", "untrained", "none", seed, {}, "untrained"))
        for objective, values in chosen.items():
            for setting in settings:
                flags: dict[str, str] = {}
                for bottleneck, value in values.items():
                    if setting in (BOTTLENECKS[bottleneck], "combined"):
                        flags.update(bottleneck_flags(objective, bottleneck, value))
                runs.append(make_run("final", objective, seed, flags, setting))
    return runs


# ------------------------------------------------------------------------------------------------ data


@dataclass
class EvaluationData:
    """What every evaluation uses, loaded once in the parent (the forked children share it)."""

    dataset: Path  # the carved save_to_disk folder train.py pretrains from
    probe_train: ImageData
    validation: ImageData
    test: ImageData
    diagnostic_images: torch.Tensor


def carve_dataset(folder: Path, train_samples: int | None, sizes: Sizes) -> Path:
    """OUT/data: Fashion-MNIST train carved into "train" and "validation" (stratified, seed 0), written once, atomically.

    Stored as PNG cells: hf_ibproj.data decodes them fastest of the image encodings `datasets` offers.
    """
    if (folder / "dataset_dict.json").is_file():
        return folder
    full = load_image_data("fashion_mnist", "train", channels=1)
    validation_rows = stratified_indices(full.labels, sizes.validation, seed=0)
    is_train = torch.ones(len(full), dtype=torch.bool)
    is_train[validation_rows] = False
    train_rows = is_train.nonzero().squeeze(1)
    if train_samples is not None:
        train_rows = train_rows[stratified_indices(full.labels[train_rows], train_samples, seed=0)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=full.class_names)})

    def split(rows: torch.Tensor) -> datasets.Dataset:
        return datasets.Dataset.from_dict(
            {"image": [img for img in full.images[rows, 0].numpy()], "label": full.labels[rows].tolist()},
            features=features)

    temporary = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    datasets.DatasetDict({"train": split(train_rows), "validation": split(validation_rows)}).save_to_disk(temporary)
    os.replace(temporary, folder)
    return folder


def load_evaluation_data(out_dir: Path, train_samples: int | None, sizes: Sizes) -> EvaluationData:
    folder = carve_dataset(out_dir / "data", train_samples, sizes)
    pretrain = load_image_data(str(folder), "train", channels=1)
    probe_rows = stratified_indices(pretrain.labels, sizes.probe_train, seed=0)
    probe = ImageData(pretrain.images[probe_rows], pretrain.labels[probe_rows], pretrain.class_names)
    validation = load_image_data(str(folder), "validation", channels=1)
    test = load_image_data("fashion_mnist", "test", channels=1, max_samples=sizes.test)
    diagnostic_images = validation.images[stratified_indices(validation.labels, sizes.diagnostics, seed=0)]
    return EvaluationData(folder, probe, validation, test, diagnostic_images)


# ------------------------------------------------------------------------------------------------ runs


def run_one(spec: RunSpec, budget: dict[str, str], data: EvaluationData, sizes: Sizes, out_dir: Path,
            results_dir: Path, threads: int) -> str:
    """Train (unless done) and evaluate one run; returns 'done', 'skipped' or 'failed (...)'."""
    summary_path = results_dir / f"{spec.name}.json"
    if summary_path.exists():
        return "skipped"
    run_dir = out_dir / spec.name
    argv = None
    if spec.stage != "untrained" and not _finished(run_dir):
        if run_dir.exists() and latest_checkpoint(run_dir) is not None:
            argv = ["--output-dir", str(run_dir), "--resume"]  # the run's stored configuration
        else:
            shutil.rmtree(run_dir, ignore_errors=True)  # cut short before its first checkpoint: start afresh
            flags = {**budget, **spec.flags, "dataset": str(data.dataset), "seed": str(spec.seed),
                     "output-dir": str(run_dir)}
            argv = [a for k, v in flags.items() for a in (f"--{k}", v)]
    log_path = out_dir / f"{spec.name}.log"
    # A forked child per run: a fresh process for Accelerate's global state that skips re-importing torch/timm/
    # transformers (~12 s of a tiny run on this 2-core machine) and shares the evaluation data loaded here.
    child = multiprocessing.get_context("fork").Process(
        target=_run_in_child, args=(spec, argv, run_dir, data, sizes, budget, summary_path, log_path, threads))
    child.start()
    child.join()
    if child.exitcode != 0:
        return f"failed (exit {child.exitcode}, see {log_path})"
    return "done"


def _finished(run_dir: Path) -> bool:
    """train.py writes wall_time_s into run_info.json (atomically) as the last step of a finished run."""
    return "wall_time_s" in RunFolder(run_dir).read_info()


def _run_in_child(spec: RunSpec, argv: list[str] | None, run_dir: Path, data: EvaluationData, sizes: Sizes,
                  budget: dict[str, str], summary_path: Path, log_path: Path, threads: int) -> None:
    """train.py's main (when `argv`), then the evaluation, in this forked process; output to `log_path`."""
    with log_path.open("a") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        # One thread per run and `jobs` runs side by side: on 2 shared cores, 2-thread OpenMP runs next to
        # other processes spin at barriers and ran ~5x slower than single-threaded ones here.
        torch.set_num_threads(threads)
        code, train_seconds, diverged = 0, None, False
        try:
            if argv is not None:
                started = time.perf_counter()
                config, args = parse_train_config(argv)
                try:
                    pretrain(config, resume=args.resume)
                except NonFiniteLossError:  # a result, not a failure: this setting diverged (redone never)
                    diverged = True
                train_seconds = round(time.perf_counter() - started, 1)
            if diverged:
                summary = _summary_head(spec) | {"diverged": True, "linear_top1": None, "knn_top1": None}
            else:
                summary = evaluate_run(spec, run_dir, data, sizes, budget)
            write_json(summary_path, {**summary, "train_time_s": train_seconds})
        except (ValueError, FileNotFoundError, FileExistsError) as error:
            print(f"compare_bottlenecks: error: {error}", file=sys.stderr)
            code = 2
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


def evaluate_run(spec: RunSpec, run_dir: Path, data: EvaluationData, sizes: Sizes, budget: dict[str, str]) -> dict:
    """The run's summary: accuracies on its split, label-free diagnostics, the last training diagnostics, times."""
    started = time.perf_counter()
    summary = _summary_head(spec)
    split = data.validation if spec.stage == "search" else data.test
    if spec.stage == "untrained":  # the same architecture and initialization as train.py's seed
        torch.manual_seed(spec.seed)
        kwargs = budget_backbone_kwargs(budget)
        backbone = IBProjModel(IBProjConfig(backbone="resnet18_small", backbone_kwargs=kwargs)).backbone
        pixels = data.probe_train.images.float().div(255)
        mean, std = [pixels.mean().item()], [pixels.std().item()]
    else:
        model = IBProjModel.from_pretrained(RunFolder(run_dir).model_dir)
        mean, std = model.config.image_mean, model.config.image_std
        backbone = model.backbone
        augment = TwoViewAugmentation("simclr", data.diagnostic_images.shape[-1], 1, mean, std)
        summary["label_free"] = label_free_diagnostics(model, data.diagnostic_images, mean, std, augment=augment,
                                                       batch_size=sizes.diagnostics_batch)
        records = RunFolder(run_dir).metrics.read()
        last = [r for r in records if "I(Z1;Z2)" in r][-1:]
        summary["training_last"] = last[0] if last else None
        throughput = [r["img_per_s"] for r in records if "img_per_s" in r]
        summary["train_img_per_s"] = statistics.median(throughput) if throughput else None
    result = evaluate_backbone(backbone, data.probe_train, split, mean, std, precision="no", progress=False)
    summary.update({"linear_top1": result["linear_top1"], "knn_top1": result["knn_top1"],
                    "linear_weight_decay": result["linear_weight_decay"], "num_train": result["num_train"],
                    "num_eval": result["num_test"], "eval_time_s": round(time.perf_counter() - started, 1)})
    return summary


def _summary_head(spec: RunSpec) -> dict:
    return {"name": spec.name, "stage": spec.stage, "objective": spec.objective, "seed": spec.seed,
            "label": spec.label, "flags": spec.flags, "split": "validation" if spec.stage == "search" else "test"}


def budget_backbone_kwargs(budget: dict[str, str]) -> dict:
    return {"in_chans": 1, **yaml.safe_load(budget["backbone-kwargs"])}


def run_all(specs: list[RunSpec], jobs: int, started: float, **kwargs) -> list[str]:
    def run_and_report(spec: RunSpec) -> str:
        run_started = time.perf_counter()
        status = run_one(spec, **kwargs)
        print(f"[{time.perf_counter() - started:7.0f}s] {spec.name}: {status} "
              f"({time.perf_counter() - run_started:.0f}s)", flush=True)
        return status

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(run_and_report, specs))


def read_summaries(results_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(results_dir.glob("*.json"))]


# ------------------------------------------------------------------------------------------------ statistics


def _runs_of(summaries: list[dict], stage: str, objective: str, label: str, diverged: bool = False) -> list[dict]:
    """The finished runs of a cell (diverged=True: its diverged runs instead), by seed."""
    return sorted((s for s in summaries if s["stage"] == stage and s["objective"] == objective
                   and s["label"] == label and s.get("diverged", False) == diverged), key=lambda s: s["seed"])


def _mean_of(summaries: list[dict], stage: str, objective: str, label: str) -> float | None:
    """Mean linear top-1 of a cell; None when it has no run or one of its runs diverged (never chosen then)."""
    values = [s["linear_top1"] for s in _runs_of(summaries, stage, objective, label)]
    if not values or _runs_of(summaries, stage, objective, label, diverged=True):
        return None
    return statistics.mean(values)


def mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} +- {std:.2f}"


def paired_difference(cell: list[dict], standard: list[dict]) -> dict:
    """Mean of the per-seed differences cell - standard over their common seeds, its 95% t-interval, a verdict."""
    base = {s["seed"]: s["linear_top1"] for s in standard}
    differences = [s["linear_top1"] - base[s["seed"]] for s in cell if s["seed"] in base]
    n = len(differences)
    if n < 2:
        return {"n": n, "mean": statistics.mean(differences) if n else None, "low": None, "high": None,
                "verdict": "n/a (fewer than 2 paired seeds)"}
    mean = statistics.mean(differences)
    half = stats.t.ppf(0.975, n - 1) * statistics.stdev(differences) / math.sqrt(n)
    low, high = mean - half, mean + half
    verdict = "helps" if low > 0 else "hurts" if high < 0 else "no detectable difference"
    return {"n": n, "mean": mean, "low": low, "high": high, "verdict": verdict}


def sweep_points(objective: str, bottleneck: str, values: tuple[str, ...]) -> list[tuple[str, str]]:
    """(label, tick) from no bottleneck to the strongest: lambda grows, L and k shrink."""
    ordered = list(values) if bottleneck == "mi_weight" else sorted(values, key=float, reverse=True)
    return [("standard", "off")] + [(f"{bottleneck}={v}", v) for v in ordered]


def inverted_u(summaries: list[dict], objective: str, bottleneck: str, values: tuple[str, ...]) -> str:
    """'shown' when the best mean lies strictly inside the sweep and beats 'off' with a paired 95% interval above 0."""
    points = sweep_points(objective, bottleneck, values)
    if len(values) == 1:
        return "not searched (one value)"
    means = [_mean_of(summaries, "search", objective, label) for label, _ in points]
    if any(m is None for m in means):
        return "incomplete (runs missing)"
    if len(points) < 3:
        return "not testable (fewer than 2 values)"
    best = max(range(len(means)), key=means.__getitem__)
    if not 0 < best < len(points) - 1:
        return f"not shown (best at the {'no-bottleneck' if best == 0 else 'strongest'} end)"
    difference = paired_difference(_runs_of(summaries, "search", objective, points[best][0]),
                                   _runs_of(summaries, "search", objective, "standard"))
    if difference["verdict"] == "helps":
        return f"shown (peak at {points[best][1]}, {difference['mean']:+.2f} pp over off)"
    return f"not shown (interior peak at {points[best][1]}, not above off: {difference['verdict']})"


def spearman_table(summaries: list[dict]) -> list[dict]:
    """Spearman rho (and p) of every label-free diagnostic with linear top-1, per group of runs."""
    groups = {"final runs, test top-1": [s for s in summaries if s["stage"] == "final"],
              "search runs, validation top-1": [s for s in summaries if s["stage"] == "search"]}
    for objective in OBJECTIVES:
        groups[f"final {objective}, test top-1"] = [s for s in groups["final runs, test top-1"]
                                                    if s["objective"] == objective]
    rows = []
    for group, runs in groups.items():
        for key in DIAGNOSTICS:
            pairs = [(s["label_free"][key], s["linear_top1"]) for s in runs if s.get("label_free")]
            rho, p = stats.spearmanr(*zip(*pairs)) if len(pairs) >= 3 else (math.nan, math.nan)
            rows.append({"group": group, "diagnostic": key, "n": len(pairs), "rho": float(rho), "p": float(p)})
    return rows


# ------------------------------------------------------------------------------------------------ report


def markdown_report(summaries: list[dict], search: dict, chosen: dict) -> str:
    lines = ["### Final runs: linear top-1 (%) on the test split, paired differences to the standard projector", "",
             "| objective | projector | chosen value(s) | seeds | linear top-1 | per seed | paired diff (95% CI) | "
             "verdict | kNN top-1 |", "|---|---|---|---|---|---|---|---|---|"]
    for objective in OBJECTIVES:
        standard = _runs_of(summaries, "final", objective, "standard")
        for setting in SETTINGS:
            runs = _runs_of(summaries, "final", objective, setting)
            if not runs and not _runs_of(summaries, "final", objective, setting, diverged=True):
                continue
            values = ", ".join(f"{b}={v}" for b, v in chosen.get(objective, {}).items()
                               if setting in (BOTTLENECKS[b], "combined"))
            linear = [s["linear_top1"] for s in runs]
            diverged = _runs_of(summaries, "final", objective, setting, diverged=True)
            if setting == "standard":
                difference, verdict = "-", "-"
            elif diverged:
                difference, verdict = "-", f"diverged on {len(diverged)} of {len(diverged) + len(runs)} seeds"
            else:
                d = paired_difference(runs, standard)
                difference = (f"{d['mean']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}]" if d["low"] is not None
                              else "-")
                verdict = d["verdict"]
            lines.append(f"| {objective} | {setting} | {values or '-'} | {len(runs)} | {mean_std(linear)} | "
                         f"{', '.join(f'{v:.2f}' for v in linear)} | {difference} | {verdict} | "
                         f"{mean_std([s['knn_top1'] for s in runs])} |")
    untrained = [s["linear_top1"] for s in summaries if s["stage"] == "untrained"]
    if untrained:
        lines += ["", f"Untrained backbones (same architecture, seeds of the final runs, same evaluation): linear "
                      f"{mean_std(untrained)}."]
        for objective in OBJECTIVES:
            standard = _mean_of(summaries, "final", objective, "standard")
            if standard is not None:
                lines.append(f"- {objective} standard projector: {standard - statistics.mean(untrained):+.2f} pp "
                             "over the untrained backbone.")

    lines += ["", "### Search on the validation split (linear top-1 %, mean +- std over search seeds)", ""]
    for objective, bottlenecks in search.items():
        for bottleneck, (values, kind) in bottlenecks.items():
            points = sweep_points(objective, bottleneck, values)
            if len(values) == 1:
                lines += [f"{objective}, {bottleneck}: not searched, {values[0]}", ""]
                continue
            lines += [f"{objective}, {bottleneck} ({kind}): chosen {chosen.get(objective, {}).get(bottleneck, '-')}; "
                      f"inverted U: {inverted_u(summaries, objective, bottleneck, values)}", "",
                      "| value | seeds | diverged | validation linear top-1 | per seed | held-out I(Z1;Z2) |",
                      "|---|---|---|---|---|---|"]
            for label, tick in points:
                runs = _runs_of(summaries, "search", objective, label)
                diverged = len(_runs_of(summaries, "search", objective, label, diverged=True))
                linear = [s["linear_top1"] for s in runs]
                mi = [s["label_free"]["I(Z1;Z2)"] for s in runs if s.get("label_free")]
                lines.append(f"| {tick} | {len(runs)} | {diverged} | {mean_std(linear)} | "
                             f"{', '.join(f'{v:.2f}' for v in linear)} | {statistics.mean(mi) if mi else math.nan:.4f} |")
            lines.append("")

    lines += ["### Label-free diagnostics against linear top-1: Spearman rho (p)", "",
              "| diagnostic (better when) | " + " | ".join(_groups(summaries)) + " |",
              "|---|" + "---|" * len(_groups(summaries))]
    table = spearman_table(summaries)
    for key, sign in DIAGNOSTICS.items():
        cells = [next(r for r in table if r["group"] == g and r["diagnostic"] == key) for g in _groups(summaries)]
        lines.append(f"| {key} ({'higher' if sign > 0 else 'lower'}) | "
                     + " | ".join(f"{c['rho']:+.2f} ({c['p']:.2g}), n={c['n']}" if math.isfinite(c["rho"])
                                  else f"-, n={c['n']}" for c in cells) + " |")
    lines += ["", "### Which final projector each diagnostic would have picked (its best mean, in its direction)", "",
              "| objective | best by test top-1 | " + " | ".join(DIAGNOSTICS) + " |", "|---|---|" + "---|" * len(DIAGNOSTICS)]
    for objective in OBJECTIVES:
        cells = {setting: _runs_of(summaries, "final", objective, setting) for setting in SETTINGS}
        cells = {k: v for k, v in cells.items() if v and all(s.get("label_free") for s in v)
                 and not _runs_of(summaries, "final", objective, k, diverged=True)}
        if not cells:
            continue
        accuracy = {k: statistics.mean(s["linear_top1"] for s in v) for k, v in cells.items()}
        picks = []
        for key, sign in DIAGNOSTICS.items():
            pick = max(cells, key=lambda k: sign * statistics.mean(s["label_free"][key] for s in cells[k]))
            picks.append(f"{pick} ({accuracy[pick]:.2f})")
        best = max(accuracy, key=accuracy.get)
        lines.append(f"| {objective} | {best} ({accuracy[best]:.2f}) | " + " | ".join(picks) + " |")

    lines += ["", "### Every run", "", "| run | split | linear | kNN | rankme | alignment | uniformity | I(Z1;Z2) | "
              "H(Z1) | I(Z1;R) | train img/s | train (s) | eval (s) |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in summaries:
        if s.get("diverged"):
            lines.append(f"| {s['name']} | {s['split']} | diverged | | | | | | | | | {_fmt(s.get('train_time_s'), 0)} | |")
            continue
        lf = s.get("label_free") or {}
        diag = " | ".join(_fmt(lf.get(k), 3) for k in ("rankme", "alignment", "uniformity", "I(Z1;Z2)", "H(Z1)",
                                                       "I(Z1;R)"))
        lines.append(f"| {s['name']} | {s['split']} | {s['linear_top1']:.2f} | {s['knn_top1']:.2f} | {diag} | "
                     f"{_fmt(s.get('train_img_per_s'), 0)} | {_fmt(s.get('train_time_s'), 0)} | "
                     f"{_fmt(s.get('eval_time_s'), 0)} |")
    return "\n".join(lines) + "\n"


def _groups(summaries: list[dict]) -> list[str]:
    return list(dict.fromkeys(r["group"] for r in spearman_table(summaries)))


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def plot_sweeps(summaries: list[dict], search: dict, path: Path) -> None:
    """Validation linear top-1 against each bottleneck's strength (mean +- std, every seed a dot): the inverted U?"""
    panels = [(o, b, values, kind) for o, bottlenecks in search.items() for b, (values, kind) in bottlenecks.items()
              if len(values) > 1]
    columns = min(3, len(panels))
    rows = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.6 * columns, 3.6 * rows), squeeze=False, constrained_layout=True)
    for ax, (objective, bottleneck, values, kind) in zip(axes.flat, panels):
        points = sweep_points(objective, bottleneck, values)
        means, stds = [], []
        for i, (label, _) in enumerate(points):
            linear = [s["linear_top1"] for s in _runs_of(summaries, "search", objective, label)]
            ax.scatter([i] * len(linear), linear, s=12, alpha=0.5, color="gray")
            means.append(statistics.mean(linear) if linear else math.nan)
            stds.append(statistics.stdev(linear) if len(linear) > 1 else 0.0)
        ax.errorbar(range(len(points)), means, yerr=stds, marker="o", capsize=3)
        ax.set_xticks(range(len(points)), [tick for _, tick in points])
        ax.set(xlabel=f"{bottleneck} (stronger to the right)", ylabel="validation linear top-1 (%)",
               title=f"{objective}, {bottleneck} ({kind})")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_diagnostics(summaries: list[dict], path: Path) -> None:
    """Test linear top-1 of every final run against each label-free diagnostic; Spearman rho (all runs, then per
    objective: I(Z1;R) and the lower bound are on each objective's own scale) in the title."""
    final = [s for s in summaries if s["stage"] == "final" and s.get("label_free")]
    table = {(r["group"], r["diagnostic"]): r["rho"] for r in spearman_table(summaries)}
    columns = 4
    fig, axes = plt.subplots(2, columns, figsize=(4.2 * columns, 7.2), squeeze=False, constrained_layout=True)
    for ax, key in zip(axes.flat, DIAGNOSTICS):
        for objective, marker in zip(OBJECTIVES, ("o", "s")):
            runs = [s for s in final if s["objective"] == objective]
            ax.scatter([s["label_free"][key] for s in runs], [s["linear_top1"] for s in runs], marker=marker, s=22,
                       label=objective)
        rhos = ", ".join(f"{name} {table[(group, key)]:+.2f}" for name, group in (
            ("all", "final runs, test top-1"), *((o, f"final {o}, test top-1") for o in OBJECTIVES)))
        ax.set(xlabel=key, ylabel="test linear top-1 (%)", title=f"Spearman rho\n{rhos}")
        ax.title.set_fontsize(9)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_accuracy_vs_mi(summaries: list[dict], path: Path) -> None:
    """The paper's Figure 3 analogue: test linear top-1 against held-out I(Z1;Z2), one point per final run."""
    fig, axes = plt.subplots(1, len(OBJECTIVES), figsize=(5.5 * len(OBJECTIVES), 4.2), squeeze=False,
                             constrained_layout=True)
    for ax, objective in zip(axes[0], OBJECTIVES):
        for setting in SETTINGS:
            runs = [s for s in _runs_of(summaries, "final", objective, setting) if s.get("label_free")]
            ax.scatter([s["label_free"]["I(Z1;Z2)"] for s in runs], [s["linear_top1"] for s in runs], label=setting,
                       s=28)
        ax.set(xlabel="held-out I(Z1;Z2) (nats)", ylabel="test linear top-1 (%)", title=objective)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(summaries: list[dict], search: dict, planned: list[RunSpec], plots_dir: Path) -> str:
    chosen = choose(search, planned, summaries)
    report = markdown_report(summaries, search, chosen)
    (plots_dir / "compare_bottlenecks.md").write_text(report)
    plot_sweeps(summaries, search, plots_dir / "compare_sweeps.png")
    plot_diagnostics(summaries, plots_dir / "compare_diagnostics.png")
    plot_accuracy_vs_mi(summaries, plots_dir / "compare_accuracy_vs_mi.png")
    return report


# ------------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="run folders and the carved data "
                        "(default: benchmarks/out/compare)")
    parser.add_argument("--results", type=Path, default=None, help="one JSON summary per finished run, committed "
                        "(default: benchmarks/compare_results)")
    parser.add_argument("--plots", type=Path, default=None, help="tables and PNGs (default: benchmarks/plots)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per final cell (default: 3)")
    parser.add_argument("--search-seeds", type=int, default=3, help="seeds per value of the three sweeps (default: 3)")
    parser.add_argument("--screen-seeds", type=int, default=1, help="seeds per value of the other searches (default: 1)")
    parser.add_argument("--jobs", type=int, default=2, help="runs side by side (default: 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (default: 1)")
    parser.add_argument("--smoke", action="store_true", help="tiny data, one step per run, a temp dir (CI)")
    parser.add_argument("--report-only", action="store_true",
                        help="train nothing: tables and plots from the summaries in --results")
    args = parser.parse_args(argv)
    for name in ("seeds", "search_seeds", "screen_seeds", "jobs", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    if args.screen_seeds > args.search_seeds:
        parser.error("--screen-seeds cannot exceed --search-seeds (the screen uses the first search seeds)")

    budget, search, sizes, train_samples, settings = BUDGET, SEARCH, Sizes(), None, SETTINGS
    if args.smoke:
        if None in (args.out, args.results, args.plots):
            temp = Path(tempfile.mkdtemp(prefix="compare_smoke_"))
            args.out, args.results, args.plots = (args.out or temp / "runs", args.results or temp / "results",
                                                  args.plots or temp / "plots")
        args.seeds, args.search_seeds, args.screen_seeds = 2, 1, 1
        budget, search, sizes, train_samples = SMOKE_BUDGET, SMOKE_SEARCH, SMOKE_SIZES, SMOKE_TRAIN_SAMPLES
        settings = SMOKE_SETTINGS
    args.out = args.out or ROOT / "benchmarks" / "out" / "compare"
    args.results = args.results or ROOT / "benchmarks" / "compare_results"
    args.plots = args.plots or ROOT / "benchmarks" / "plots"
    for folder in (args.results, args.plots) if args.report_only else (args.out, args.results, args.plots):
        folder.mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    failed = []
    stage1 = search_runs(search, args.search_seeds, args.screen_seeds)
    if not args.report_only:
        data = load_evaluation_data(args.out, train_samples, sizes)
        common = dict(budget=budget, data=data, sizes=sizes, out_dir=args.out, results_dir=args.results,
                      threads=args.threads)
        print(f"budget: {' '.join(f'--{k} {v!r}' for k, v in budget.items())}; {args.jobs} runs side by side, "
              f"{args.threads} thread(s) each", flush=True)
        print(f"stage 1 (search, validation split): {len(stage1)} runs", flush=True)
        failed += [s for s in run_all(stage1, args.jobs, started, **common) if s.startswith("failed")]
        chosen = choose(search, stage1, read_summaries(args.results))
        stage2 = final_runs(chosen, args.seeds, settings)
        print(f"chosen on the validation split: {chosen}\nstage 2 (final, test split): {len(stage2)} runs", flush=True)
        failed += [s for s in run_all(stage2, args.jobs, started, **common) if s.startswith("failed")]
    summaries = read_summaries(args.results)
    print(write_report(summaries, search, stage1, args.plots))
    print(f"{len(summaries)} run summaries in {args.results} ({len(failed)} failed in this invocation, "
          f"{(time.perf_counter() - started) / 60:.1f} min); tables and plots in {args.plots}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
