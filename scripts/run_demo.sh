#!/usr/bin/env bash
# The whole GET run (stage 1 + stage 2) on the built-in demo data: scikit-learn's handwritten
# digits (10 classes, 5 old), on the CPU in about 2 minutes on 2 cores; installs the
# requirements into ./.venv on first use. Extra flags go to train.py.
#
# The CLIP is a tiny one that has learnt a little language: weights/GET-tiny-digits.pt, made by
# scripts/pretrain_tiny_clip.py (contrastive image-text pre-training on digits rendered from
# fonts and pen strokes, never on scikit-learn's digits; zero-shot 0.75 on them). As in the
# paper, CLIP is fine-tuned from its last block only (--grad_from_block 3 of 4 blocks). The
# rest suits the small data and model, not the paper's ViT-B/16: small batches, a lower
# learning rate, a narrower head MLP, fewer epochs and a 10-epoch teacher warm-up.
#
# It ends with a web page of the clusters of the unlabelled training digits (report.py
# --gallery: RUN/gallery/index.html), their new clusters named from the ten digit names
# (DEMO_GALLERY=0: no page).
set -euo pipefail
source "$(dirname "$0")/setup_env.sh"
# One thread unless asked otherwise: the model is too small to gain from more, and on cores
# shared with other work spinning OpenMP threads stall (measured: 3 min instead of 1).
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
log="$(mktemp)"
names="$(mktemp)"
trap 'rm -f "$log" "$names"' EXIT
"$PY" train.py --dataset_name digits --clip_model GET-tiny-digits \
    --pretrained weights/GET-tiny-digits.pt --device cpu \
    --grad_from_block 3 --tes_epochs 5 --epochs 40 --batch_size 32 --lr 0.05 \
    --warmup_teacher_temp_epochs 10 --head_hidden_dim 256 --head_bottleneck_dim 64 \
    --eval_every 10 --num_workers 0 --exp_name demo "$@" | tee "$log"

# The run's folder, as train.py names it in its first lines (extra flags may have moved it).
run_dir="$(sed -n 's/^.* INFO run folder: //p' "$log" | tail -n 1)"
if [ -z "$run_dir" ] || [ ! -f "$run_dir/last.pt" ] || [ "${DEMO_GALLERY:-1}" = 0 ]; then
    exit 0  # no stage-2 model (e.g. --stage tes), or no page asked for (DEMO_GALLERY=0)
fi
if ! "$PY" -c 'import json, sys; sys.exit(json.load(open(sys.argv[1])).get("branches", "both") != "both")' \
        "$run_dir/config.json"; then
    exit 0  # a single-branch ablation: the page shows GET's fused clusters
fi
printf '%s\n' zero one two three four five six seven eight nine > "$names"
"$PY" report.py --gallery "$run_dir" --pretrained weights/GET-tiny-digits.pt --name_candidates "$names" \
    --device cpu
echo "[demo] the clusters of the unlabelled training digits, to look at in a web browser:"
echo "    $run_dir/gallery/index.html"
