"""Fine-tune a pretrained backbone for image classification: `hf-ibproj finetune` as a script (hf_ibproj/finetune.py).

    accelerate launch finetune.py --model timm/resnet18.a1_in1k --dataset uoft-cs/cifar10 --output-dir ft/resnet18
    accelerate launch --multi_gpu --num_processes 2 finetune.py ...      # DDP; on CPUs set ACCELERATE_USE_CPU=true
    python finetune.py --help                                          # every flag, with its default
"""

import sys

from hf_ibproj.finetune_cli import main

if __name__ == "__main__":
    sys.exit(main())
