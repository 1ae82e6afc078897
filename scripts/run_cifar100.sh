#!/usr/bin/env bash
# GET on CIFAR-100 with the paper settings (both stages, CLIP ViT-B/16, 200 + 200 epochs,
# batch 128, lr 0.1, sup_weight 0.35, memax_weight 4). Extra arguments go to train.py.
set -euo pipefail
source "$(dirname "$0")/common.sh"
run_get cifar100 --exp_name get "$@"
