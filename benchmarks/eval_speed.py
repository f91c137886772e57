"""Wall time of the frozen-backbone evaluation of the CPU preset's backbone on Fashion-MNIST (target <= 3 minutes).

The backbone is the CPU preset's (configs/fashion_mnist_cpu.yaml) at 28x28: untrained by default; pass
--model RUN to time a trained one (its features may need a different number of L-BFGS steps).
The phases are those of `hf_ibproj.evaluation.evaluate_backbone`: feature extraction of the 60k train and 10k test
images, the linear probe (weight decay chosen on a validation split, then refit), and the weighted kNN.

    .venv/bin/python benchmarks/eval_speed.py            # full run, prints the timings and writes JSON
    .venv/bin/python benchmarks/eval_speed.py --smoke    # seconds: a few hundred images
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from hf_ibproj.backbones import create_backbone
from hf_ibproj.data import load_image_data
from hf_ibproj.train_config import DEFAULT_PRESET, TrainConfig, read_preset
from hf_ibproj.evaluation import PRECISIONS, check_labels, extract_features, knn_accuracy, linear_probe
from hf_ibproj.runs import cpu_name
from hf_ibproj.sources import resolve_source

TARGET_SECONDS = 180
PRESET = TrainConfig(**read_preset(DEFAULT_PRESET)).model_config()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="a few hundred images: checks the script runs")
    parser.add_argument("--model", default=None, help="a trained run / saved model / exported backbone folder")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--output", type=Path, default=None, help="JSON report (default: benchmarks/out/)")
    args = parser.parse_args()
    default_name = "eval_speed_smoke.json" if args.smoke else "eval_speed.json"
    output = args.output or Path(__file__).parent / "out" / default_name
    max_samples = (512, 256) if args.smoke else (None, None)

    load_start = os.getloadavg()[0]
    timings = {}
    start = time.perf_counter()
    if args.model:
        source = resolve_source(args.model)
        backbone, preprocessing = source.backbone, source.data_config()
        mean, std = preprocessing["mean"], preprocessing["std"]
    else:
        torch.manual_seed(0)
        backbone, mean, std = create_backbone(PRESET.backbone, **PRESET.backbone_kwargs), (0.5,), (0.5,)
    train, test = (load_image_data("fashion_mnist", split, channels=1, max_samples=limit)
                   for split, limit in zip(("train", "test"), max_samples))
    num_classes = check_labels(train.labels, test.labels, train.class_names)
    timings["load_data_s"] = time.perf_counter() - start

    phase = time.perf_counter()
    train_features = extract_features(backbone, train.images, mean, std, args.batch_size, precision=args.precision)
    test_features = extract_features(backbone, test.images, mean, std, args.batch_size, precision=args.precision)
    timings["extract_features_s"] = time.perf_counter() - phase
    phase = time.perf_counter()
    linear = linear_probe(train_features, train.labels, test_features, test.labels, num_classes)
    timings["linear_probe_s"] = time.perf_counter() - phase
    phase = time.perf_counter()
    knn = knn_accuracy(train_features, train.labels, test_features, test.labels, num_classes)
    timings["knn_s"] = time.perf_counter() - phase
    timings["total_s"] = time.perf_counter() - start

    report = {
        "smoke": args.smoke,
        "model": args.model or f"{PRESET.backbone} {PRESET.backbone_kwargs}, untrained (seed 0)",
        "num_train": len(train), "num_test": len(test), "num_features": train_features.shape[1],
        "precision": args.precision, "batch_size": args.batch_size,
        "extract_images_per_s": (len(train) + len(test)) / timings["extract_features_s"],
        **{key: round(value, 2) for key, value in timings.items()},
        "linear": linear, "knn": knn,
        "target_s": TARGET_SECONDS, "target_met": None if args.smoke else timings["total_s"] <= TARGET_SECONDS,
        "torch_threads": torch.get_num_threads(), "load_average_start": load_start,
        "load_average_end": os.getloadavg()[0], "cpu": cpu_name(),
        "torch": torch.__version__,
    }
    print(json.dumps(report, indent=2))
    verdict = {None: "not judged on a smoke run", True: "MET", False: "MISSED"}[report["target_met"]]
    print(f"total {timings['total_s']:.1f} s for {len(train)} + {len(test)} images "
          f"(target <= {TARGET_SECONDS} s on the full data: {verdict})")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
