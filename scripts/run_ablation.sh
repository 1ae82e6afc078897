#!/usr/bin/env bash
# The paper's ablation on one dataset: every row below over SEEDS seeds (default 3), each row an
# experiment ablation-<row> of scripts/run_seeds.sh (the dataset's own settings, then the row's
# flags, then yours), and the table of them all at the end (report.py --ablation).
#
#   bash scripts/run_ablation.sh DATASET [SEEDS] [train.py flags...]
#   bash scripts/run_ablation.sh digits 3                 # the demo's ablation (README)
#   ROWS="simgcd get" bash scripts/run_ablation.sh cub 3  # some rows only
#   bash scripts/run_ablation.sh cub 3 --resume auto      # continue after an interruption
#
# Rows (what each changes from GET):
#   simgcd              --branches visual: SimGCD on the same CLIP (no stage 1, no text branch, no CICO)
#   get-no-cico         --cico_weight 0
#   get                 GET as the paper
#   get-no-align        --align_weight 0       (stage 1 without the image-text alignment)
#   get-no-distill-ce   --distill_ce_weight 0  (stage 1 without the distillation cross-entropy)
#   get-no-distill-mse  --distill_mse_weight 0 (stage 1 without the distillation squared distance)
#   text                --branches text: the text branch alone (not in the default ROWS)
set -euo pipefail
all_rows="simgcd get-no-cico get get-no-align get-no-distill-ce get-no-distill-mse"
usage="usage: bash scripts/run_ablation.sh DATASET [SEEDS] [train.py flags...]
  ROWS (default: $all_rows; also: text) chooses the rows"
if [ $# -lt 1 ]; then
    echo "$usage" >&2
    exit 2
fi
dataset="$1"; shift
seeds=3
if [ $# -gt 0 ] && [[ "$1" =~ ^[0-9]+$ ]]; then
    seeds="$1"; shift
fi

row_flags() {
    case "$1" in
        simgcd) echo "--branches visual" ;;
        get-no-cico) echo "--cico_weight 0" ;;
        get) echo "" ;;
        get-no-align) echo "--align_weight 0" ;;
        get-no-distill-ce) echo "--distill_ce_weight 0" ;;
        get-no-distill-mse) echo "--distill_mse_weight 0" ;;
        text) echo "--branches text" ;;
        *) echo "unknown row '$1'; rows: $all_rows text" >&2; return 2 ;;
    esac
}

rows="${ROWS:-$all_rows}"
for row in $rows; do row_flags "$row" > /dev/null; done  # every row known before any run
here="$(cd "$(dirname "$0")" && pwd)"
export DEMO_GALLERY=0  # the demo's web page of clusters: not for every run of a table
for row in $rows; do
    echo "[run_ablation] $dataset, row $row: $(row_flags "$row")" >&2
    # shellcheck disable=SC2046  # the row's flags are words
    bash "$here/run_seeds.sh" "$dataset" "$seeds" --exp_name "ablation-$row" $(row_flags "$row") "$@"
done
# The runs' folder: --exp_root among the flags, else GET_OUTPUT_ROOT, else ./outputs.
source "$here/setup_env.sh"
runs="$("$PY" -c 'import sys, config; print(config.output_root(sys.argv[1] or None))' "$(flag_value --exp_root "$@")")/$dataset"
"$PY" report.py --ablation "$runs" --out_dir "$runs/ablation_report"
