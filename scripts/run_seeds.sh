#!/usr/bin/env bash
# Run GET on one dataset with N seeds, one run each, through the dataset's own script
# (scripts/run_<dataset>.sh: the paper settings; digits: scripts/run_demo.sh). Run s gets
# --seed s and --exp_name <name>-seed<s>, which report.py groups back into one experiment.
#
#   bash scripts/run_seeds.sh DATASET N [train.py flags...]
#   bash scripts/run_seeds.sh cub 3                              # get-seed0, get-seed1, get-seed2
#   bash scripts/run_seeds.sh cub 3 --exp_name lr05 --lr 0.05    # lr05-seed0 ... (experiment lr05)
#   FIRST_SEED=3 bash scripts/run_seeds.sh cub 2                 # seeds 3 and 4
#   bash scripts/run_seeds.sh cub 3 --resume auto                # after an interruption: each seed
#                                                                # continues (finished ones re-evaluate)
#   python report.py outputs/cub                                 # the table, mean ± std over seeds
#
# The seeds run one after the other; the first that fails stops the script. NPROC, NNODES...
# work as for the dataset scripts. DATASET is a --dataset_name.
set -euo pipefail
usage="usage: bash scripts/run_seeds.sh DATASET N [train.py flags...]
  DATASET: cifar10 cifar100 imagenet_100 imagenet_1k cub scars aircraft herbarium_19 digits
  N: number of seeds (FIRST_SEED, default 0, is the first)"
if [ $# -lt 2 ]; then
    echo "$usage" >&2
    exit 2
fi
dataset="$1"; n="$2"; shift 2
case "$dataset" in
    cifar10|cifar100|cub|scars|aircraft) script="run_$dataset.sh" ;;
    imagenet_100) script=run_imagenet100.sh ;;
    imagenet_1k) script=run_imagenet1k.sh ;;
    herbarium_19) script=run_herb19.sh ;;
    digits) script=run_demo.sh ;;
    *) echo "unknown DATASET '$dataset'"$'\n'"$usage" >&2; exit 2 ;;
esac
first="${FIRST_SEED:-0}"
if ! [[ "$n" =~ ^[1-9][0-9]*$ ]] || ! [[ "$first" =~ ^[0-9]+$ ]]; then
    echo "N must be a positive number of seeds and FIRST_SEED a seed >= 0; got N='$n', FIRST_SEED='$first'" >&2
    echo "$usage" >&2
    exit 2
fi

# --exp_name among the flags names the experiment (default: get); the seed is set here.
name=get
flags=()
while [ $# -gt 0 ]; do
    case "$1" in
        --exp_name)
            if [ $# -lt 2 ]; then echo "--exp_name needs a value" >&2; exit 2; fi
            name="$2"; shift 2 ;;
        --exp_name=*) name="${1#--exp_name=}"; shift ;;
        --seed|--seed=*)
            echo "run_seeds.sh sets --seed itself: set FIRST_SEED=S to start from seed S" >&2; exit 2 ;;
        *) flags+=("$1"); shift ;;
    esac
done

here="$(cd "$(dirname "$0")" && pwd)"
last=$((first + n - 1))
for ((seed = first; seed <= last; seed++)); do
    echo "[run_seeds] $dataset, seed $seed (of $first..$last): --exp_name $name-seed$seed" >&2
    bash "$here/$script" --seed "$seed" --exp_name "$name-seed$seed" ${flags[@]+"${flags[@]}"}
done
echo "[run_seeds] $n run(s) of $dataset done. Table: python report.py outputs/$dataset (or <--exp_root>/$dataset)" >&2
