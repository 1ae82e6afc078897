# Sourced by the other scripts: find or create the Python environment, install what is
# missing, and set PY. On first use it creates ./.venv and installs the requirements; set
# GET_PYTHON=/path/to/python to use an environment of your own instead (nothing is installed).
REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -n "${GET_PYTHON:-}" ]; then
    PY="$GET_PYTHON"
else
    VENV="$REPO_DIR/.venv"
    REQ_FILE="$REPO_DIR/${GET_REQUIREMENTS:-requirements.txt}"
    if [ ! -x "$VENV/bin/python" ]; then
        echo "[setup] creating $VENV" >&2
        python3 -m venv "$VENV"
    fi
    # Re-install only when the requirements file changed since the last install.
    stamp="$VENV/.installed-$(basename "$REQ_FILE")-$(cat "$REPO_DIR"/requirements*.txt | cksum | cut -d' ' -f1)"
    if [ ! -f "$stamp" ]; then
        echo "[setup] installing $(basename "$REQ_FILE") (first run: a few minutes)" >&2
        "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r "$REQ_FILE"
        touch "$stamp"
    fi
    PY="$VENV/bin/python"
fi
export PYTHONUNBUFFERED=1
cd "$REPO_DIR"

# The value of the flag $1 among the arguments that follow (--flag VALUE or --flag=VALUE, the
# last one wins; empty when absent): the scripts read where train.py will look or write.
flag_value() {
    local flag="$1" value="" prev=""; shift
    for arg in "$@"; do
        if [ "$prev" = "$flag" ]; then value="$arg"; fi
        case "$arg" in "$flag"=*) value="${arg#"$flag"=}" ;; esac
        prev="$arg"
    done
    printf '%s' "$value"
}
