"""Pretrain an encoder with a bottleneck projector ("Projection Head is Secretly an Information Bottleneck").

    python train.py                                   # CPU preset: SimCLR on Fashion-MNIST in 10 minutes, probe + kNN
    python train.py --config configs/cifar10_simclr.yaml --quantize-levels 30
    accelerate launch --num_processes 8 train.py --config configs/imagenet100_barlow_twins.yaml
    python train.py --output-dir runs/x --resume      # continue runs/x from its latest checkpoint, as configured
    python train.py --help                            # every flag, with the preset's value

The command line of `hf_ibproj.pretrain_cli` (from Python: `pretrain(TrainConfig.from_preset(...))`).
"""

import time

PROCESS_START = time.time()  # a time budget counts from here, before the heavy imports

import sys  # noqa: E402

from hf_ibproj.pretrain_cli import main  # noqa: E402

if __name__ == "__main__":
    try:
        sys.exit(main(started_at=PROCESS_START))
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"train.py: error: {error}", file=sys.stderr)
        sys.exit(2)
