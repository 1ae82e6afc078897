# Sourced by scripts/run_<dataset>.sh: run both GET stages on one dataset with train.py.
#   run_get DATASET [train.py flags...]
# Extra flags given to the script come last and so override the paper settings, e.g.
#   bash scripts/run_scars.sh --epochs 1 --data_root /somewhere/stanford_cars
# Multi-GPU: NPROC=4 bash scripts/run_imagenet1k.sh  (torchrun on this machine);
# several machines: set NNODES, NODE_RANK and MASTER_ADDR (and MASTER_PORT) as well, or
# RDZV_ENDPOINT=host:port (and RDZV_ID) instead for torchrun's c10d rendezvous, where the
# machines need no rank (scripts/slurm/ uses it).
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"

# Stop before any work if the dataset folder is missing, naming the folder and the fix.
check_dataset_root() {
    local dataset="$1"; shift
    local root
    root="$(flag_value --data_root "$@")"
    "$PY" - "$dataset" "$root" <<'PYEOF'
import sys
import config
name, override = sys.argv[1], sys.argv[2] or None
try:
    builtin = config.is_builtin(name)
except ValueError as err:  # an unknown name: the valid ones
    sys.exit(str(err))
if builtin:
    sys.exit(0)  # made in memory (digits): no folder to find
root = config.dataset_root(name, override)
if not root.is_dir():
    sys.exit(f"[{name}] dataset folder not found: {root}\n"
             f"Put the dataset there, set {config.root_env_var(name)}=/path/to/it, or pass "
             f"--data_root /path/to/it (see docs/datasets.md).")
PYEOF
}

# The torchrun command line, into the array TORCHRUN: NPROC processes on each of NNODES
# machines, joined by the c10d rendezvous at RDZV_ENDPOINT when it is set (every machine runs
# the same command), else as node NODE_RANK of MASTER_ADDR:MASTER_PORT.
torchrun_command() {
    TORCHRUN=("$PY" -m torch.distributed.run --nproc_per_node "${NPROC:-1}" --nnodes "${NNODES:-1}")
    if [ -n "${RDZV_ENDPOINT:-}" ]; then
        TORCHRUN+=(--rdzv_backend c10d --rdzv_endpoint "$RDZV_ENDPOINT" --rdzv_id "${RDZV_ID:-get}")
    else
        TORCHRUN+=(--node_rank "${NODE_RANK:-0}" --master_addr "${MASTER_ADDR:-127.0.0.1}"
                   --master_port "${MASTER_PORT:-29500}")
    fi
}

run_get() {
    local dataset="$1"; shift
    check_dataset_root "$dataset" "$@"
    if [ "${NPROC:-1}" -gt 1 ] || [ "${NNODES:-1}" -gt 1 ]; then
        torchrun_command
        "${TORCHRUN[@]}" train.py --dataset_name "$dataset" "$@"
    else
        "$PY" train.py --dataset_name "$dataset" "$@"
    fi
}
