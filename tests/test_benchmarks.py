"""The benchmark scripts' reports: ``--save`` writes what the script prints, as the Markdown the book includes."""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"


@pytest.fixture
def bench(monkeypatch):
    """Import a module of benchmarks/ the way the scripts do (their folder first on ``sys.path``)."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return importlib.import_module


def test_save_writes_the_printed_report(tmp_path, bench):
    out = tmp_path / "results" / "phantom.md"  # the folder does not exist yet
    command = ["benchmarks/phantom.py", "--cases", "1", "--shape", "64", "64", "48", "--no-memory", "--save", str(out)]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    printed = subprocess.run([sys.executable, *command], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    first, body = out.read_text(encoding="utf-8").split("\n\n", 1)
    assert first == f"% Written by `python {' '.join(command)}`; not edited by hand."
    assert body == bench("_report").to_markdown(printed.stdout)
    assert "| case seed |" in body and "```text\ndate: " in body
    assert [p.name for p in out.parent.iterdir()] == ["phantom.md"]  # no temporary file left beside it


def test_markdown_fences_text_and_keeps_tables_lists_and_headings(bench):
    printed = "# run 1\n# load 0.1\n\n## 1 thread\n\n| a |\n|---|\n| 1 |\n\n- note\n  continued\n- PASS\nend\n"
    expected = (
        "```text\n# run 1\n# load 0.1\n```\n\n## 1 thread\n\n| a |\n|---|\n| 1 |\n\n- note\n  continued\n- PASS\n\n"
        "```text\nend\n```\n"
    )
    assert bench("_report").to_markdown(printed) == expected


def test_attention_report_from_log_checks_the_tables_against_the_measured_lines(bench):
    attention = bench("attention")
    grid = (4, 4, 4)
    rows = {
        (grid, "dense"): {"fwd_ms": 2.0, "fwd_n": 3, "fwd_mb": 1.0},
        (grid, "gather"): {"fwd_ms": 0.5, "fwd_n": 5, "fwd_mb": 0.5},
    }
    measured = [f"  measured {m:6s} 4×4×4 threads=1: {values}" for (_, m), values in rows.items()]
    rows.update({(grid, m): {} for m in ("naive", "flex")})
    table = attention._table(rows, [grid], ("dense", "gather"))
    log = "\n".join(["# header", *measured, "", "## 1 thread", "", *table, "", "- acceptance: PASS"]) + "\n"
    report = attention.report_from_log(log)
    assert report == "\n".join(["# header", "", "## 1 thread", "", *table, "", "- acceptance: PASS"]) + "\n"
    with pytest.raises(ValueError, match="differs"):
        attention.report_from_log(log.replace("| 2.0 |", "| 1.9 |"))


def test_attention_speedup_interval_resamples_each_round_as_a_pair(bench):
    """Rounds whose speed swings threefold but whose ratio is 13 in each give exactly 13: the two calls of a round are
    resampled together (resampling them independently would spread the ratio over roughly 5–35×)."""
    attention = bench("attention")
    speed = [1.0, 3.0, 1.5, 2.5, 2.0, 1.2, 2.8]  # the machine's slowness, round by round
    dense = [[13.0 * s] for s in speed]
    vbra = [[s, s, s] for s in speed]
    low, high = attention.speedup_interval(dense, vbra)
    assert low == pytest.approx(13.0) and high == pytest.approx(13.0)


def test_attention_speedup_interval_covers_the_run_and_pairs_rounds_by_index(bench):
    attention = bench("attention")
    ratios = [11.0, 12.0, 13.0, 14.0, 15.0]
    dense = [[r] for r in ratios] + [[100.0]] * 3  # three more rounds than the other call: left out, not paired
    vbra = [[1.0]] * 5
    low, high = attention.speedup_interval(dense, vbra, draws=4000)
    assert 11.0 <= low < 13.0 < high <= 15.0  # the median round's 13× inside, never beyond the extreme rounds
    assert attention.speedup_interval(dense, vbra, draws=4000) == (low, high)  # seeded: the same run, the same text
    assert attention.speedup_interval(dense[:2], vbra[:2]) is None  # under 3 rounds in common: no interval


def test_attention_acceptance_line_gives_the_medians_interval_and_fastest_calls(bench):
    attention = bench("attention")
    grid = attention.ACCEPT_GRID
    dense = {"fwd_ms": 39.0, "fwd_mb": 2.0, "fwd_rounds": [[26.0], [52.0], [39.0]]}
    gather = {"fwd_ms": 3.0, "fwd_mb": 1.0, "fwd_rounds": [[2.5, 2.0], [4.0, 4.0], [3.0, 3.5]]}
    rows = {(grid, "dense"): dense, (grid, "gather"): gather, (grid, "serial"): {}, (grid, "flex"): {}}
    acceptance = attention._checks(rows, [grid], "1 thread", 16.0)[-1]
    assert acceptance.startswith("acceptance 1 thread, 32×32×16 ")
    assert "PASS" in acceptance and "medians 13.00×" in acceptance and "fastest calls 13.0×" in acceptance  # 26 / 2
    assert "95 % interval over rounds" in acceptance
    rows[(grid, "gather")] = {**gather, "fwd_ms": 3.258}  # 11.97× by the medians: below the target, and shown so
    acceptance = attention._checks(rows, [grid], "1 thread", 16.0)[-1]
    assert "FAIL (" in acceptance and "medians 11.97×" in acceptance


def _attention_log(dense: list, gather: list, threads: int = 1) -> str:
    """What a run of benchmarks/attention.py prints at 32×32×16 (measured lines only), with these forward rounds."""
    rows = {
        "dense": {"fwd_ms": 0.0, "fwd_n": 0, "fwd_rounds": dense},
        "gather": {"fwd_ms": 0.0, "fwd_n": 0, "fwd_rounds": gather},
    }
    return "\n".join(f"  measured {m:6s} 32×32×16 threads={threads}: {v}" for m, v in rows.items()) + "\n"


def test_attention_runs_gives_medians_fastest_calls_and_the_fastest_over_all_runs(tmp_path, bench):
    runs = bench("attention_runs")
    quiet = _attention_log([[10.0], [12.0], [11.0]], [[1.0], [1.2], [1.0]])  # medians 11 / 1.0, fastest 10 / 1.0
    busy = _attention_log([[9.0], [20.0], [30.0]], [[1.5], [2.0], [1.5]])  # medians 20 / 1.5, fastest 9 / 1.5
    lines = runs.report({"quiet": quiet, "busy": busy}, (32, 32, 16))
    assert lines[2].startswith("| quiet | 1 | 11.0 | 10.0 | 1.0 | 1.0 | 11.00× | ")
    assert lines[2].endswith(" | 10.00× |")
    assert lines[3].startswith("| busy | 1 | 20.0 | 9.0 | 1.5 | 1.5 | 13.33× | ")
    assert lines[3].endswith(" | 6.00× |")
    # Over both runs: dense's fastest call is busy's 9 ms, V-BRA's is quiet's 1.0 ms.
    assert lines[-1] == (
        "- threads=1: speed-up of the medians ≥ 12× in 1 of 2 runs; fastest calls over all runs: dense 9.0 ms (busy), "
        "V-BRA 1.0 ms (quiet): 9.00×"
    )
    log = tmp_path / "run.txt"
    log.write_text(quiet.replace(", 'fwd_rounds'", ", 'x'"), encoding="utf-8")  # a run before per-round samples
    with pytest.raises(ValueError, match="per-round samples"):
        runs.report({"old": log.read_text(encoding="utf-8")}, (32, 32, 16))
    with pytest.raises(ValueError, match="no dense and gather forward times at 16x16x8"):
        runs.report({"quiet": quiet}, (16, 16, 8))


def _included_results() -> list[tuple[Path, str]]:
    """``(page, target)`` for every ``{include} results/<name>.md`` of a book page."""
    import re

    found = []
    for page in sorted((ROOT / "book").glob("*.md")):
        for target in re.findall(r"```\{include\} (results/[\w.-]+\.md)", page.read_text(encoding="utf-8")):
            found.append((page, target))
    return found


def test_book_results_are_reports_the_scripts_saved():
    """Each result a page includes was written by a benchmark script's ``--save`` to that very file, and no page keeps
    a pasted block (the book's rule: no number typed by hand)."""
    included = _included_results()
    assert {page.name for page, _ in included} >= {"benchmark_attention.md", "benchmark_training.md"}
    for page, target in included:
        path = ROOT / "book" / target
        assert path.is_file(), f"{page.name} includes {target}, which does not exist"
        first = path.read_text(encoding="utf-8").splitlines()[0]
        assert first.startswith("% Written by `python benchmarks/"), (target, first)
        assert f"--save book/{target}`" in first, (target, first)
    for page in (ROOT / "book").glob("*.md"):
        assert "Pasted from" not in page.read_text(encoding="utf-8"), page.name


def test_run_worker_returns_the_workers_last_json_line_or_its_error(tmp_path, bench):
    worker = bench("_worker")
    script = tmp_path / "script.py"
    script.write_text(
        "import json, sys\n"
        "payload = json.loads(sys.argv[2])\n"
        "if payload < 0:\n"
        "    raise SystemExit('negative payload')\n"
        "print('progress')\n"
        "print(json.dumps({'twice': 2 * payload}))\n",
        encoding="utf-8",
    )
    assert worker.run_worker(str(script), 21) == {"twice": 42}
    assert worker.run_worker(str(script), -1) == {"error": "negative payload"}
    assert worker.thread_counts("1,2") == [1, 2]
    for bad in ("", "0", "1,x"):
        with pytest.raises(argparse.ArgumentTypeError):
            worker.thread_counts(bad)
