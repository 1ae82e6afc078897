#!/usr/bin/env bash
# GET on CUB-200-2011 with the paper settings (both stages, CLIP ViT-B/16, 200 + 200 epochs,
# batch 128, lr 0.1, sup_weight 0.35, memax_weight 2). Extra arguments go to train.py.
set -euo pipefail
source "$(dirname "$0")/common.sh"
run_get cub --exp_name get "$@"
