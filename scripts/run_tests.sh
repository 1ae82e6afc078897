#!/usr/bin/env bash
# Run the test suite on CPU (installs requirements-dev.txt into ./.venv on first use).
# Two pytest workers (one per core of a small machine). Extra arguments go to pytest,
# e.g. `bash scripts/run_tests.sh -k losses` or `-n 0` for one process.
set -euo pipefail
GET_REQUIREMENTS=requirements-dev.txt
source "$(dirname "$0")/setup_env.sh"
"$PY" -m pytest -q -n 2 tests "$@"
