#!/usr/bin/env bash
# The GPU check, one command on one CUDA GPU (under 10 minutes on an H100): the CUDA test tier
# (pytest -m cuda tests/test_gpu.py), bench/step_time.py on ViT-B-16 with random weights (nothing
# to download; batch 128, bf16: stage 1, stage 2, evaluation), bench/eval_cache.py,
# bench/data_loading.py with 0 4 8 16 loader workers, bench/estimate_k.py (the K estimate's
# k-means at 100k and 1M points) and the demo on the GPU. Writes
# outputs/gpu_check/gpu_check-<card>.json and .md (a section ready for docs/benchmarks.md) and
# prints the expected wall time of each benchmark's paper schedule on the card and the loader
# workers that keep it fed. Extra flags go to bench/gpu_check.py: --out DIR, --skip demo,...;
# --device cpu runs its CPU mode (tiny sizes, the same code path; tests/test_gpu_check.py).
# Exit status 0 when every step ran and no test failed.
set -euo pipefail
source "$(dirname "$0")/setup_env.sh"
exec "$PY" bench/gpu_check.py "$@"
