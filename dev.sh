#!/usr/bin/env bash
# h3de-lite's two commands:
#   bash dev.sh book   build the Jupyter Book into _build/html (notebooks executed at H3DE_SCALE, default "book")
#   bash dev.sh test   run the unit tests and the docstring examples of h3de_lite (--doctest-modules), and execute
#                      every notebook with nbval (H3DE_SCALE, default "smoke")
# Both create (first time) and reuse a virtual environment in .venv (override with H3DE_VENV), install CPU
# torch 2.13.0 when the environment has no torch, and install this package editable with its test and book extras.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

VENV="${H3DE_VENV:-.venv}"
TORCH_VERSION="2.13.0"
TORCH_CPU_INDEX="${H3DE_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}"

quiet_pip() {
    # pip prints a warning for every local index folder it skips; keep the real messages only.
    python -m pip "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}

setup() {
    if [ ! -x "$VENV/bin/python" ]; then
        local py="${PYTHON:-$(command -v python3.11 || command -v python3)}"
        echo "dev.sh: creating $VENV with $("$py" --version)"
        "$py" -m venv "$VENV"
    fi
    # shellcheck disable=SC1091
    . "$VENV/bin/activate"
    if ! python -c "import torch" 2>/dev/null; then
        echo "dev.sh: installing CPU torch $TORCH_VERSION"
        if quiet_pip install -q --no-index --no-deps "torch==$TORCH_VERSION" 2>/dev/null; then
            quiet_pip install -q "torch==$TORCH_VERSION"  # a local CPU wheel was found; now its dependencies
        else
            quiet_pip install -q "torch==$TORCH_VERSION" --index-url "$TORCH_CPU_INDEX"
        fi
    fi
    local stamp="$VENV/.h3de-lite-installed"
    if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
        echo "dev.sh: installing h3de-lite (editable) with its test and book extras"
        quiet_pip install -q -e ".[test,book]"
        touch "$stamp"
    fi
}

case "${1:-}" in
    test)
        shift
        setup
        export H3DE_SCALE="${H3DE_SCALE:-smoke}" MPLBACKEND=Agg
        notebooks=()
        if compgen -G "notebooks/*.ipynb" >/dev/null; then notebooks=(notebooks); fi
        # --doctest-modules imports the .py files under the paths given here (h3de_lite/ and tests/) and runs their
        # examples; nbval collects the .ipynb files under notebooks/. benchmarks/ and book/scripts/ are not passed.
        python -m pytest h3de_lite tests "${notebooks[@]}" --doctest-modules --nbval-lax --nbval-cell-timeout=600 \
            -p no:cacheprovider "$@"
        ;;
    book)
        shift
        setup
        export H3DE_SCALE="${H3DE_SCALE:-book}"
        jupyter-book build . --path-output . "$@"
        echo "dev.sh: open _build/html/index.html"
        ;;
    *)
        echo "usage: bash dev.sh test [pytest args] | bash dev.sh book [jupyter-book args]" >&2
        exit 2
        ;;
esac
