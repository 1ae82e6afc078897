#!/usr/bin/env bash
# Submit GET training (both stages) to SLURM as one job that survives its time limit: shortly
# before the limit the training saves its state, the job requeues itself and continues from
# there, exactly (scripts/slurm/train.sbatch says how).
#
#   bash scripts/slurm/submit.sh DATASET [--nodes N] [--gpus_per_node G] [--cpus_per_gpu C]
#                                [--time D-HH:MM:SS] [train.py flags...]
#   bash scripts/slurm/submit.sh cub --nodes 2 --gpus_per_node 4 --time 24:00:00
#   bash scripts/slurm/submit.sh imagenet_1k --nodes 4 --gpus_per_node 8 --exp_name lr05 --lr 0.05
#
# Defaults: 1 node, 1 GPU, 8 CPUs per GPU (train.py's --num_workers is per GPU), 24:00:00.
# --gpus_per_node 0 asks for no GPU (one process per node). --batch_size stays the global
# batch. Other sbatch settings through sbatch's own variables, e.g. SBATCH_PARTITION=gpu,
# SBATCH_ACCOUNT=..., SBATCH_QOS=..., SBATCH_SIGNAL=B:USR1@600 (more time to save). The job's
# output goes to outputs/slurm/<job name>-<job id>.out, the run to outputs/DATASET/ as usual.
set -euo pipefail
usage="usage: bash scripts/slurm/submit.sh DATASET [--nodes N] [--gpus_per_node G] [--cpus_per_gpu C] [--time T] [train.py flags...]"
if [ $# -lt 1 ] || [[ "$1" == -* ]]; then
    echo "$usage" >&2
    exit 2
fi
dataset="$1"; shift
nodes=1 gpus=1 cpus=8 time=24:00:00
flags=()
while [ $# -gt 0 ]; do
    case "$1" in
        --nodes=*|--gpus_per_node=*|--cpus_per_gpu=*|--time=*)
            set -- "${1%%=*}" "${1#*=}" "${@:2}" ;;  # --time=T: as --time T
        --nodes|--gpus_per_node|--cpus_per_gpu|--time)
            if [ $# -lt 2 ]; then echo "$1 needs a value"$'\n'"$usage" >&2; exit 2; fi
            case "$1" in
                --nodes) nodes="$2" ;; --gpus_per_node) gpus="$2" ;;
                --cpus_per_gpu) cpus="$2" ;; --time) time="$2" ;;
            esac
            shift 2 ;;
        *) flags+=("$1"); shift ;;
    esac
done
if ! [[ "$nodes" =~ ^[1-9][0-9]*$ && "$gpus" =~ ^[0-9]+$ && "$cpus" =~ ^[1-9][0-9]*$ ]]; then
    echo "--nodes and --cpus_per_gpu must be positive numbers and --gpus_per_node a number >= 0;" \
         "got --nodes '$nodes' --gpus_per_node '$gpus' --cpus_per_gpu '$cpus'"$'\n'"$usage" >&2
    exit 2
fi

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
# Stop here, not in the queue, if the dataset is missing (the job checks again on its node).
source "$repo/scripts/common.sh"
check_dataset_root "$dataset" ${flags[@]+"${flags[@]}"}

processes=$(( gpus > 0 ? gpus : 1 ))
resources=(--nodes "$nodes" --cpus-per-task "$(( processes * cpus ))" --time "$time")
if [ "$gpus" -gt 0 ]; then resources+=(--gres "gpu:$gpus"); fi
mkdir -p "$repo/outputs/slurm"  # SLURM does not create the output file's folder
# The job runs in the repository (sbatch copies the batch script elsewhere, so it cannot find
# the repository from its own path); NPROC: one process per GPU on each node.
sbatch --job-name "get-$dataset" "${resources[@]}" --chdir "$repo" \
    --output "$repo/outputs/slurm/%x-%j.out" --export "ALL,NPROC=$processes" \
    "$here/train.sbatch" "$dataset" ${flags[@]+"${flags[@]}"}
