#!/usr/bin/env bash
# The whole GET run (stage 1 + stage 2) on the built-in demo data: scikit-learn's handwritten
# digits (10 classes, 5 old), with a tiny randomly initialised CLIP on the CPU. A few minutes
# on 2 cores; installs the requirements into ./.venv on first use. Extra flags go to train.py.
#
# The tiny CLIP has no pretraining, so the demo trains every visual block (--grad_from_block 0),
# uses small batches, a lower learning rate, a narrower head MLP and a 10-epoch teacher
# warm-up: settings for learning from scratch, not the paper's fine-tuning of CLIP ViT-B/16.
set -euo pipefail
source "$(dirname "$0")/setup_env.sh"
"$PY" train.py --dataset_name digits --clip_model GET-tiny --pretrained none --device cpu \
    --grad_from_block 0 --tes_epochs 3 --epochs 60 --batch_size 32 --lr 0.02 \
    --warmup_teacher_temp_epochs 10 --head_hidden_dim 256 --head_bottleneck_dim 64 \
    --eval_every 10 --num_workers 0 --exp_name demo "$@"
