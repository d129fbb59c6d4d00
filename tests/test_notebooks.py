"""The notebooks as stored: one canonical Setup, clean files, one H3DE_SCALE knob, readable code, one repository URL.

Executing the notebooks is nbval's job (``bash dev.sh test`` passes ``notebooks/`` to pytest with ``--nbval-lax``);
these tests read the files only, plus two runs of the install cell that never reach the network.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
MAX_LINE = 88  # code lines in notebooks: what fits the book's code column without a scroll bar

_spec = importlib.util.spec_from_file_location("sync_notebooks", ROOT / "book" / "scripts" / "sync_notebooks.py")
sync_notebooks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sync_notebooks)


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def _source(cell: dict) -> str:
    return "".join(cell["source"])


def _code_cells(path: Path) -> list[dict]:
    return [cell for cell in _load(path)["cells"] if cell["cell_type"] == "code"]


def test_there_are_notebooks() -> None:
    assert NOTEBOOKS, "no notebooks/*.ipynb found"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_in_sync_with_the_repository_settings(path: Path) -> None:
    """Badge, install cell and device cell as book/scripts/sync_notebooks.py writes them; no outputs stored."""
    problems = sync_notebooks.problems(path)
    assert not problems, "\n".join(problems) + "\nrun: python book/scripts/sync_notebooks.py"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_first_code_cell_is_the_canonical_install_cell(path: Path) -> None:
    repo = sync_notebooks.repository()
    cells = _code_cells(path)
    assert _source(cells[0]) == sync_notebooks.install_cell(repo)
    assert _source(cells[1]) == sync_notebooks.device_cell()


def test_first_code_cells_are_identical_across_notebooks() -> None:
    firsts = {path.name: _source(_code_cells(path)[0]) for path in NOTEBOOKS}
    assert len(set(firsts.values())) == 1, sorted(firsts)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stored_without_outputs(path: Path) -> None:
    for index, cell in enumerate(_load(path)["cells"]):
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [], f"cell {index} has outputs"
            assert cell["execution_count"] is None, f"cell {index} has an execution count"


@pytest.mark.parametrize("path", [*NOTEBOOKS, ROOT / "book" / "model_cards.ipynb"], ids=lambda p: p.stem)
def test_every_cell_has_a_unique_id(path: Path) -> None:
    """nbformat 4.5 cells carry an id; without one the book build warns (MissingIDFieldWarning)."""
    nb = _load(path)
    assert (nb["nbformat"], nb["nbformat_minor"]) >= (4, 5)
    ids = [cell.get("id") for cell in nb["cells"]]
    assert None not in ids, f"cells without an id: {[i for i, c in enumerate(ids) if c is None]}"
    assert len(set(ids)) == len(ids), "duplicate cell ids"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_title_cell_names_the_notebook(path: Path) -> None:
    first = _load(path)["cells"][0]
    number = path.name[:2]
    assert first["cell_type"] == "markdown"
    assert _source(first).startswith(f"# {number} · "), "the first cell must be '# 0N · Title'"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_parameters_cell_reads_h3de_scale(path: Path) -> None:
    tagged = [cell for cell in _code_cells(path) if "parameters" in cell["metadata"].get("tags", [])]
    assert len(tagged) == 1, "exactly one code cell must be tagged 'parameters'"
    source = _source(tagged[0])
    assert re.search(r'H3DE_SCALE = os\.environ\.get\("H3DE_SCALE", "book"\)', source), source
    for scale in ("smoke", "book", "full"):
        assert f'"{scale}"' in source, f"the parameters cell does not say what {scale!r} means"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_code_lines_fit_the_page(path: Path) -> None:
    long = [
        f"cell {index}: {line}"
        for index, cell in enumerate(_load(path)["cells"])
        if cell["cell_type"] == "code"
        for line in _source(cell).splitlines()
        if len(line) > MAX_LINE
    ]
    assert not long, f"{len(long)} code lines longer than {MAX_LINE} characters:\n" + "\n".join(long)


def _figures(path: Path) -> dict[str, str]:
    """``{name: caption}`` of the cells whose output the book shows as a numbered figure (MyST-NB cell metadata)."""
    figures = {}
    for index, cell in enumerate(_load(path)["cells"]):
        figure = cell["metadata"].get("mystnb", {}).get("figure")
        if figure is not None:
            assert cell["cell_type"] == "code", f"cell {index}: a figure caption on a {cell['cell_type']} cell"
            assert figure.get("name") and figure.get("caption"), f"cell {index}: a figure needs a name and a caption"
            assert figure["name"] not in figures, f"cell {index}: figure name {figure['name']!r} used twice"
            figures[figure["name"]] = figure["caption"]
    return figures


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_has_numbered_figures_that_its_text_cites(path: Path) -> None:
    """At least one captioned figure per page; every {numref} resolves to a figure of the page, named fig-NN-...

    The book builds with -W, where an unknown {numref} target fails the build; this finds it without a build.
    """
    figures = _figures(path)
    assert figures, "no numbered figure: give the main figure's cell metadata mystnb.figure {name, caption}"
    number = path.name[:2]
    assert all(name.startswith(f"fig-{number}-") for name in figures), sorted(figures)
    cited = {
        target
        for cell in _load(path)["cells"]
        if cell["cell_type"] == "markdown"
        for target in re.findall(r"\{numref\}`(?:[^`<]*<)?([^`>]+)>?`", _source(cell))
    }
    assert cited <= set(figures), f"{{numref}} without a figure: {sorted(cited - set(figures))}"


def test_repository_url_is_the_same_in_config_and_pyproject() -> None:
    url = yaml.safe_load((ROOT / "_config.yml").read_text())["repository"]["url"].rstrip("/")
    pyproject = (ROOT / "pyproject.toml").read_text()
    section = pyproject.split("[project.urls]", 1)[1].split("\n[", 1)[0]
    urls = dict(re.findall(r'^(\w+)\s*=\s*"([^"]+)"', section, re.MULTILINE))
    assert urls["Repository"] == url
    assert urls["Issues"] == f"{url}/issues"
    owner, name = url.rsplit("/", 2)[-2:]
    assert urls["Documentation"] == f"https://{owner}.github.io/{name}"


def _run_install_cell(extra_env: dict[str, str], hide_package: bool) -> subprocess.CompletedProcess:
    code = sync_notebooks.install_cell(sync_notebooks.repository())
    if hide_package:  # a kernel without h3de_lite: find_spec returns None for a module set to None
        code = "import sys\nsys.modules['h3de_lite'] = None\n" + code
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1", **extra_env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


def test_install_cell_skips_installing_when_the_package_is_importable() -> None:
    result = _run_install_cell({"H3DE_LITE_SOURCE": "file:///nonexistent/h3de-lite"}, hide_package=False)
    assert result.returncode == 0, result.stderr
    assert "installing" not in result.stdout
    assert "h3de-lite" in result.stdout


def test_install_cell_fails_with_a_clear_message(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-checkout"
    result = _run_install_cell({"H3DE_LITE_SOURCE": missing.as_uri()}, hide_package=True)
    assert result.returncode != 0
    assert "RuntimeError: Installing h3de-lite from" in result.stderr
    assert str(missing) in result.stderr and "pip exit code" in result.stderr
    assert "ModuleNotFoundError" not in result.stderr
