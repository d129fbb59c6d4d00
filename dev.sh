#!/usr/bin/env bash
# h3de-lite's two commands:
#   bash dev.sh book   build the Jupyter Book into _build/html: every notebook executed at H3DE_SCALE (default
#                      "book"), every page re-read (--all), and any warning, a cell that raises included, fails the
#                      build (-W --keep-going: all warnings are listed first, then the exit status is non-zero)
#   bash dev.sh test   run the unit tests and the docstring examples of h3de_lite (--doctest-modules), and execute
#                      every notebook with nbval (H3DE_SCALE, default "smoke")
# Both create (first time) and reuse a virtual environment in .venv (override with H3DE_VENV), install CPU
# torch 2.13.0 when the environment has no torch, and install this package editable with its test and book extras.
# H3DE_INSTALL=0 installs nothing and uses an environment as it is: H3DE_VENV's, else the active one (conda, or a
# venv shared by several checkouts, whose editable install must not be switched to this one).
# CI (.github/workflows/ci.yml, through .ci/run) and the book deployment (.github/workflows/book.yml) run exactly these.
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
    if [ "${H3DE_INSTALL:-1}" = 0 ]; then
        # Use an environment as it is: H3DE_VENV's if set (a venv or a conda prefix), else the active one.
        if [ -n "${H3DE_VENV:-}" ]; then
            if [ ! -x "$VENV/bin/python" ]; then
                echo "dev.sh: H3DE_INSTALL=0 uses an existing environment, and $VENV/bin/python is missing" >&2
                exit 2
            fi
            export PATH="$VENV/bin:$PATH"
        fi
        echo "dev.sh: H3DE_INSTALL=0, using $(command -v python) as it is"
        return
    fi
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

notebook_cache_key() {
    # What the executed notebooks depend on besides their own code cells (which jupyter-cache hashes itself): the
    # scale, the library, the installed packages. The key changes when any of them does.
    {
        echo "H3DE_SCALE=$H3DE_SCALE"
        find h3de_lite -name "*.py" -type f | LC_ALL=C sort | xargs sha256sum
        sha256sum pyproject.toml
        python -m pip list --format=freeze --exclude-editable 2>/dev/null
    } | sha256sum | cut -d " " -f 1
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
        # jupyter-cache (_build/.jupyter_cache) reuses a notebook's outputs while its code cells are unchanged. It
        # does not know the scale or the library, so it is emptied when they change: a book built at "smoke" never
        # shows smoke outputs in a "book" build, and a library change re-executes every notebook.
        cache="_build/.jupyter_cache"
        key="$(notebook_cache_key)"
        if [ -d "$cache" ] && [ "$(cat "$cache.key" 2>/dev/null)" != "$key" ]; then
            echo "dev.sh: the scale, the library or the packages changed since the last build: re-executing every notebook"
            rm -rf "$cache"
        fi
        mkdir -p _build
        echo "$key" > "$cache.key"
        start=$SECONDS
        jupyter-book build . --path-output . --all -W --keep-going "$@"
        echo "dev.sh: book built at H3DE_SCALE=$H3DE_SCALE in $((SECONDS - start)) s, no warnings; open _build/html/index.html"
        ;;
    *)
        echo "usage: bash dev.sh test [pytest args] | bash dev.sh book [jupyter-book args]" >&2
        exit 2
        ;;
esac
