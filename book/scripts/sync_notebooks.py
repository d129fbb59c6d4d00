"""Keep every notebook's Colab badge, Setup cells and stored form in line with the repository settings.

The repository URL and branch live in one place, ``_config.yml``'s ``repository:`` (which also drives the book's
Colab launch buttons); the package version lives in ``pyproject.toml``. A notebook cannot read either on Colab, where
only the notebook file is opened, so this script writes them into each notebook:

- the Colab badge in the first (title) cell: ``.../github/OWNER/REPO/blob/BRANCH/notebooks/NAME.ipynb``;
- the first code cell, :func:`install_cell`: identical in every notebook; imports ``h3de_lite`` where the kernel has
  it, otherwise installs the pinned version from the repository and fails with a clear message if that fails;
- the second code cell, :func:`device_cell`: identical in every notebook; says which device runs the notebook and
  what the ``full`` scale needs;
- outputs, execution counts and kernel-session metadata are removed (notebooks are stored clean).

A notebook written before this script had one Setup cell that began with ``try: import h3de_lite except
ImportError: %pip install ...``; :func:`sync` replaces that prefix by the two canonical cells and keeps the rest of
the cell (imports, seed) as the notebook's own setup cell.

Usage (from the repository root)::

    python book/scripts/sync_notebooks.py           # rewrite notebooks/*.ipynb in place
    python book/scripts/sync_notebooks.py --check   # exit 1 and list what is out of date (tests do the same)

``tests/test_notebooks.py`` runs the check, so a fork that changes ``repository.url`` is told to run this script.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = ROOT / "notebooks"
BADGE_IMAGE = "https://colab.research.google.com/assets/colab-badge.svg"
_BADGE_RE = re.compile(r"^\[!\[Open In Colab\]\([^)]*\)\]\([^)]*\)$", re.MULTILINE)
# The first lines of the Setup cell that notebooks had before the canonical cells (removed by `sync`).
_LEGACY_SETUP_RE = re.compile(
    r"\A(?:import sys\n+)?try:\n    import h3de_lite\nexcept ImportError:[^\n]*\n    %pip install[^\n]*\n"
    r"    import h3de_lite\n+",
)
_LEGACY_DEVICE_RE = re.compile(r'^device = torch\.device\("cuda" if torch\.cuda\.is_available\(\) else "cpu"\)\n',
                               re.MULTILINE)


def repository(root: Path = ROOT) -> dict[str, str]:
    """``url``, ``branch``, ``owner``, ``name`` and ``version``, from ``_config.yml`` and ``pyproject.toml``."""
    config = yaml.safe_load((root / "_config.yml").read_text())["repository"]
    url = str(config["url"]).rstrip("/")
    match = re.fullmatch(r"https://github\.com/([^/]+)/([^/]+)", url)
    if match is None:
        raise ValueError(f"_config.yml repository.url must be https://github.com/OWNER/REPO, got {url!r}")
    version = re.search(r'^version\s*=\s*"([^"]+)"', (root / "pyproject.toml").read_text(), re.MULTILINE)
    if version is None:
        raise ValueError("pyproject.toml has no [project] version")
    return {"url": url, "branch": str(config.get("branch", "main")), "owner": match[1], "name": match[2],
            "version": version[1]}


def badge(notebook: str, repo: dict[str, str]) -> str:
    """The Markdown Colab badge that opens ``notebooks/<notebook>`` from the repository's branch."""
    target = (f"https://colab.research.google.com/github/{repo['owner']}/{repo['name']}/blob/{repo['branch']}"
              f"/notebooks/{notebook}")
    return f"[![Open In Colab]({BADGE_IMAGE})]({target})"


def install_cell(repo: dict[str, str]) -> str:
    """The first code cell of every notebook: use h3de-lite if importable, else install the pinned version.

    Installs ``h3de-lite @ git+URL@BRANCH`` (the same branch the Colab badge opens the notebook from, so notebook and
    library match) and then checks that the installed version is the one this notebook was written for
    (``pyproject.toml``'s version when the notebooks were synced). ``H3DE_LITE_SOURCE`` overrides the source: a fork,
    a tag (``git+URL@v0.1.0``) or a local checkout.
    """
    source = f"git+{repo['url']}@{repo['branch']}"
    return f'''# Setup 1/2 (the same cell in every notebook): import h3de-lite, or install it where
# it is missing (Colab, a fresh environment). Written by book/scripts/sync_notebooks.py.
import importlib.util
import os
import subprocess
import sys

H3DE_LITE_VERSION = "{repo['version']}"  # the version these notebooks were written for
# where to install from; H3DE_LITE_SOURCE can name a fork, a tag or file:///a/checkout
H3DE_LITE_SOURCE = os.environ.get(
    "H3DE_LITE_SOURCE", "{source}"
)

if importlib.util.find_spec("h3de_lite") is None:
    print(f"installing h3de-lite {{H3DE_LITE_VERSION}} from {{H3DE_LITE_SOURCE}} ...")
    requirement = f"h3de-lite @ {{H3DE_LITE_SOURCE}}"
    pip = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", requirement],
        capture_output=True,
        check=False,
        text=True,
    )
    importlib.invalidate_caches()
    if pip.returncode != 0 or importlib.util.find_spec("h3de_lite") is None:
        raise RuntimeError(
            f"Installing h3de-lite from {{H3DE_LITE_SOURCE}} failed (pip exit code "
            f"{{pip.returncode}}). Check the network and the source, or install it "
            f"yourself and restart the kernel. pip said:\\n{{pip.stderr.strip()[-3000:]}}"
        )
import h3de_lite

if h3de_lite.__version__ != H3DE_LITE_VERSION:
    print(
        f"note: h3de-lite {{h3de_lite.__version__}} is installed; these notebooks were "
        f"written for {{H3DE_LITE_VERSION}}"
    )
print(f"h3de-lite {{h3de_lite.__version__}} from {{os.path.dirname(h3de_lite.__file__)}}")'''


def device_cell() -> str:
    """The second code cell of every notebook: the device that runs it, and what each scale needs."""
    return '''# Setup 2/2 (the same cell in every notebook): which device runs this notebook.
import torch

device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if device.type == "cuda":
    gpu = torch.cuda.get_device_properties(device)
    print(f"device: cuda, {gpu.name} with {gpu.total_memory / 2**30:.0f} GiB")
else:
    print("device: cpu (no CUDA GPU found)")
print(
    "H3DE_SCALE=smoke and =book run on a CPU. =full is the paper's setting (the paper "
    "preset on 128 x 128 x 64 crops), meant for a CUDA GPU: on Colab, choose "
    "Runtime > Change runtime type > GPU."
)'''


def _source(cell: dict) -> str:
    source = cell.get("source", "")
    return "".join(source) if isinstance(source, list) else source


def _set_source(cell: dict, text: str) -> None:
    lines = text.splitlines(keepends=True)
    cell["source"] = lines


def _new_code_cell(text: str, cell_id: str) -> dict:
    cell = {"cell_type": "code", "execution_count": None, "id": cell_id, "metadata": {}, "outputs": []}
    _set_source(cell, text)
    return cell


def code_cells(nb: dict) -> list[dict]:
    return [cell for cell in nb["cells"] if cell["cell_type"] == "code"]


def problems(path: Path, repo: dict[str, str] | None = None) -> list[str]:
    """What is out of date in one notebook; empty when it is in sync."""
    repo = repo or repository()
    nb = json.loads(path.read_text())
    found = []
    first = nb["cells"][0] if nb["cells"] else {}
    if first.get("cell_type") != "markdown" or not _source(first).startswith("# "):
        found.append("the first cell is not a Markdown cell with the '# 0N · Title' heading")
    elif badge(path.name, repo) not in _source(first):
        found.append(f"the Colab badge is not {badge(path.name, repo)}")
    cells = code_cells(nb)
    if len(cells) < 2 or _source(cells[0]) != install_cell(repo):
        found.append("the first code cell is not the canonical install cell")
    if len(cells) < 2 or _source(cells[1]) != device_cell():
        found.append("the second code cell is not the canonical device cell")
    for index, cell in enumerate(nb["cells"]):
        if cell["cell_type"] == "code" and (cell.get("outputs") or cell.get("execution_count") is not None):
            found.append(f"cell {index} has stored outputs or an execution count")
        if "execution" in cell.get("metadata", {}):
            found.append(f"cell {index} has execution timing metadata")
    return found


def sync(path: Path, repo: dict[str, str] | None = None) -> bool:
    """Rewrite one notebook in place; returns whether anything changed."""
    repo = repo or repository()
    text = path.read_text()
    nb = json.loads(text)
    title = nb["cells"][0]
    if title["cell_type"] == "markdown":
        source = _source(title)
        if _BADGE_RE.search(source):
            source = _BADGE_RE.sub(lambda _: badge(path.name, repo), source, count=1)
        else:  # no badge yet: put it under the heading
            heading, _, rest = source.partition("\n")
            source = f"{heading}\n\n{badge(path.name, repo)}\n{rest}"
        _set_source(title, source)

    cells = code_cells(nb)
    canonical = [install_cell(repo), device_cell()]
    first_source = _source(cells[0]) if cells else ""
    if cells and first_source.startswith("# Setup 1/2"):
        _set_source(cells[0], canonical[0])
        if len(cells) > 1 and _source(cells[1]).startswith("# Setup 2/2"):
            _set_source(cells[1], canonical[1])
        else:
            nb["cells"].insert(nb["cells"].index(cells[0]) + 1, _new_code_cell(canonical[1], "setup-device"))
    else:
        # a legacy Setup cell: drop its install prefix (and its device line, now in the device cell), keep the rest
        rest = _LEGACY_SETUP_RE.sub("", first_source, count=1) if cells else ""
        rest = _LEGACY_DEVICE_RE.sub("", rest)
        position = nb["cells"].index(cells[0]) if cells else len(nb["cells"])
        new = [_new_code_cell(canonical[0], "setup-install"), _new_code_cell(canonical[1], "setup-device")]
        if cells and _LEGACY_SETUP_RE.match(first_source):
            _set_source(cells[0], rest.strip("\n"))
        nb["cells"][position:position] = new

    for cell in nb["cells"]:
        cell.get("metadata", {}).pop("execution", None)
        if cell["cell_type"] == "code":
            cell["outputs"] = []
            cell["execution_count"] = None
    new_text = json.dumps(nb, indent=1, sort_keys=True, ensure_ascii=False) + "\n"
    if new_text != text:
        path.write_text(new_text)
        return True
    return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="*", type=Path, help="default: notebooks/*.ipynb")
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a notebook is out of date")
    args = parser.parse_args(argv)
    paths = args.notebooks or sorted(NOTEBOOKS.glob("*.ipynb"))
    repo = repository()
    status = 0
    for path in paths:
        if args.check:
            for problem in problems(path, repo):
                print(f"{path}: {problem}")
                status = 1
        elif sync(path, repo):
            print(f"{path}: updated")
    if args.check and status:
        print("run: python book/scripts/sync_notebooks.py", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
