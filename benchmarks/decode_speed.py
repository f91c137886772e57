"""Images/s one DataLoader worker delivers for 224 px training crops: decoded cache vs decoding per sample.

Synthetic JPEGs (300-500 px per side, never square, made here) are read three ways, in this process (one worker's
rate; a loader's is about this times its workers, while cores last):
  on-the-fly, full   `decode_capped` without a cap: the default of a --streaming run;
  on-the-fly, capped `decode_capped` with the shorter side capped at --side: what the cache holds;
  cache              `DecodedImageCache.image`, the same bytes from memory-mapped files (--decoded-cache-side).
Each is timed for the image alone ("decode") and for a training item ("item": the image and its two
RandomResizedCrops to 224 px, `FullImageCrops`); the best of --repeats passes over every image counts. The cache is
built first in --workers DataLoader workers (its build time is printed too).

    .venv/bin/python benchmarks/decode_speed.py            # 300 images, prints the table and the ratios, writes JSON
    .venv/bin/python benchmarks/decode_speed.py --smoke    # seconds: 12 images, one pass
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from hf_ibproj.data import DecodedImageCache, FullImageCrops, StreamingImageDataset, decode_capped
from hf_ibproj.runs import cpu_name

IMAGE_SIZE = 224


def make_jpegs(folder: Path, count: int, seed: int = 0) -> None:
    """`count` JPEGs (quality 90) of 300-500 px per side, never square: smooth colour gradients plus noise, closer to
    a photo's compressibility than pure noise. Two class folders, so the split has labels."""
    rng = np.random.default_rng(seed)
    for index in range(count):
        width, height = rng.integers(300, 501, 2)
        if width == height:
            width += 1
        ys, xs = np.mgrid[0:height, 0:width]
        phases = rng.uniform(0, 2 * np.pi, 3)
        pixels = np.stack([127 + 80 * np.sin(xs / (20 + 15 * c) + ys / 37 + phases[c]) for c in range(3)], axis=-1)
        pixels += rng.normal(0, 12, pixels.shape)
        path = folder / "train" / f"class{index % 2}" / f"{index:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path, quality=90)


def best_rate(read, rows: int, repeats: int) -> float:
    """Images/s of `read(row)` over every row, the best of `repeats` passes."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for row in range(rows):
            read(row)
        best = min(best, time.perf_counter() - start)
    return rows / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="12 images, one pass: checks the script runs")
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--side", type=int, default=256, help="the cache's shorter side (--decoded-cache-side)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers that build the cache")
    parser.add_argument("--output", type=Path, default=None, help="JSON report (default: benchmarks/out/)")
    args = parser.parse_args()
    if args.smoke:
        args.images, args.repeats = 12, 1
    output = args.output or Path(__file__).parent / "out" / f"decode_speed{'_smoke' if args.smoke else ''}.json"
    torch.set_num_threads(1)  # a DataLoader worker computes on one thread

    with tempfile.TemporaryDirectory(prefix="decode_speed-") as tmp:
        make_jpegs(Path(tmp) / "data", args.images)
        stream = StreamingImageDataset.from_source(str(Path(tmp) / "data"), channels=3, image_size=IMAGE_SIZE)
        started = time.perf_counter()
        cache = DecodedImageCache.open_or_build(stream, args.side, num_workers=args.workers, root=Path(tmp) / "cache")
        build_s = time.perf_counter() - started
        cache_bytes = sum(path.stat().st_size for path in cache.folder.iterdir())

        def decode(side):
            return lambda row: decode_capped(stream.dataset[row]["image"], 3, side)

        readers = {
            "on-the-fly, full": (decode(None), FullImageCrops(stream, IMAGE_SIZE, 2, 0.08, seed=0)),
            "on-the-fly, capped": (decode(args.side),
                                   FullImageCrops(stream, IMAGE_SIZE, 2, 0.08, seed=0, max_side=args.side)),
            "cache": (cache.image, FullImageCrops(stream, IMAGE_SIZE, 2, 0.08, seed=0, cache=cache)),
        }
        rates = {name: {"decode_img_per_s": best_rate(image, len(stream), args.repeats),
                         "item_img_per_s": best_rate(crops.__getitem__, len(stream), args.repeats)}
                 for name, (image, crops) in readers.items()}

    ratios = {f"cache / {name}": {key: rates["cache"][key] / rates[name][key] for key in rates["cache"]}
              for name in ("on-the-fly, full", "on-the-fly, capped")}
    report = {"smoke": args.smoke, "images": args.images, "image_size": IMAGE_SIZE, "side": args.side,
              "sizes": "300-500 px per side, non-square JPEG q90", "rates_per_worker": rates, "ratios": ratios,
              "cache_build_s": round(build_s, 2), "cache_build_workers": args.workers,
              "cache_mb": round(cache_bytes / 1e6, 1), "cpu": cpu_name(),
              "cpu_cores_usable": len(os.sched_getaffinity(0)), "torch": torch.__version__}
    print(f"{args.images} JPEGs of 300-500 px -> {IMAGE_SIZE} px crops, one worker (1 thread); cache side "
          f"{args.side}: built in {build_s:.1f} s by {args.workers} workers, {report['cache_mb']} MB")
    print(f"{'':20}  {'decode img/s':>12}  {'item img/s':>10}")
    for name, rate in rates.items():
        print(f"{name:20}  {rate['decode_img_per_s']:12,.0f}  {rate['item_img_per_s']:10,.0f}")
    for name, ratio in ratios.items():
        print(f"{name}: decode {ratio['decode_img_per_s']:.2f}x, item {ratio['item_img_per_s']:.2f}x")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
