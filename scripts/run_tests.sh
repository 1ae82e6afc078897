#!/usr/bin/env bash
# Run the test suite on CPU (installs requirements-dev.txt into ./.venv on first use).
# Extra arguments go to pytest, e.g. `bash scripts/run_tests.sh -k losses`.
set -euo pipefail
GET_REQUIREMENTS=requirements-dev.txt
source "$(dirname "$0")/setup_env.sh"
"$PY" -m pytest -q tests "$@"
