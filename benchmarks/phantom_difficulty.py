"""How hard is the phantom? The acceptance measurements of phantom v2 (issue 10), computed on a fresh dataset.

The cases are exactly those ``write_phantom_dataset(out, seed=SEED, n_train=N, n_val=0, n_test=0)`` would write (same
per-case seeds, 30 % incomplete), generated in memory with their tissue labels. For each difficulty asked for it
prints one table:

- **Procrustes residual** (mm): the 14 landmarks (mm, voxel × spacing) of the complete cases, aligned by generalized
  Procrustes analysis with similarity transforms (translation, rotation, scale; iterated to the mean shape), then
  scaled back to the mean centroid size: the mean distance of a landmark to the mean shape's. What is left once the
  pose is known; today's v1 phantom leaves about 1.2 mm.
- **brighter than enamel**: share of cases with at least 10 voxels outside the teeth (label not enamel, dentin or
  pulp) brighter than the 99th percentile of that case's enamel voxels.
- **non-tooth above the enamel threshold**: the case's enamel threshold is halfway between the median HU of its
  enamel and of its dentin voxels (the threshold that would separate the two); among the voxels above it, the share
  whose label is not tooth (metal, streaks, bone after blur), averaged over the cases.
- **third molars**: share of cases with a present lower third molar that is partly erupted or impacted, and the
  count of each class.
- **situations**: number of cases showing each missing-tooth situation.
- **seconds per case**: wall and CPU (process) time of ``generate_phantom`` on one thread (``OMP_NUM_THREADS=1``, set
  before NumPy loads); the load average of the machine is printed too: on a shared machine the wall time grows with
  the load, the CPU time much less. The first case that holds metal also builds the projector (about 0.4 s, cached
  for the rest of the process).

Under the table, one line per target of issue 10 says whether v2 meets it (``PASS`` / ``FAIL``), and with both
difficulties a line compares v2 with v1.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/phantom_difficulty.py                    # 50 cases, v1 and v2, 192×192×128
    python benchmarks/phantom_difficulty.py --cases 12 --shape 112 112 80 --difficulty v2
    OMP_NUM_THREADS=1 python benchmarks/phantom_difficulty.py --save book/results/phantom_difficulty.md  # the book's

``--save PATH`` also writes the printed report to a Markdown file (``benchmarks/_report.py``).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one core, before NumPy / SciPy start their thread pools

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402

import numpy as np  # noqa: E402
from _report import add_save_option, saved_report  # noqa: E402  (benchmarks/_report.py)

from h3de_lite.data.phantom import DEFAULT_SHAPE, Tissue, _dataset_jobs, generate_phantom  # noqa: E402
from h3de_lite.data.phantom_teeth import SITUATIONS, THIRD_MOLAR_CLASSES  # noqa: E402

TOOTH = (Tissue.ENAMEL, Tissue.DENTIN, Tissue.PULP)
# issue 10's targets for v2
RESIDUAL_MM = (2.0, 4.0)  # Procrustes residual
BRIGHT_SHARE = 0.25  # cases with non-tooth brighter than enamel
NON_TOOTH_SHARE = 0.10  # non-tooth share above the enamel threshold
MOLAR_SHARE = 0.33  # cases with an impacted or tilted third molar
SECONDS_BUDGET = 5.0  # CPU seconds per case, one thread


def procrustes_residual(shapes: np.ndarray, iterations: int = 20) -> float:
    """Mean landmark distance (mm) to the mean shape after generalized similarity Procrustes alignment.

    Args:
        shapes: ``(N, L, 3)`` landmark sets in mm, no NaN.

    Returns:
        The mean over cases and landmarks of the distance between each aligned landmark and the mean shape's, with
        the mean shape scaled to the cases' mean centroid size, so the result is in mm.
    """
    centred = shapes - shapes.mean(axis=1, keepdims=True)
    size = np.sqrt((centred**2).sum(axis=(1, 2)))
    unit = centred / size[:, None, None]
    mean = unit[0]
    aligned = unit.copy()
    for _ in range(iterations):
        for i, shape in enumerate(unit):
            u, s, vt = np.linalg.svd(shape.T @ mean)
            d = np.sign(np.linalg.det(u @ vt))
            rotation = u @ np.diag([1.0, 1.0, d]) @ vt
            scale = (s * np.array([1.0, 1.0, d])).sum()  # optimal similarity scale onto the mean
            aligned[i] = scale * shape @ rotation
        new = aligned.mean(axis=0)
        new /= np.sqrt((new**2).sum())
        if np.allclose(new, mean, atol=1e-10):
            break
        mean = new
    residual = np.linalg.norm(aligned - mean[None], axis=2) * size.mean()
    return float(residual.mean())


def threshold_measures(volume: np.ndarray, tissue: np.ndarray) -> tuple[bool, float]:
    """(something outside the teeth brighter than enamel, non-tooth share above the enamel threshold)."""
    enamel = volume[tissue == Tissue.ENAMEL]
    dentin = volume[tissue == Tissue.DENTIN]
    tooth = np.isin(tissue, TOOTH)
    bright = int(np.count_nonzero((volume > np.percentile(enamel, 99)) & ~tooth))
    threshold = 0.5 * (np.median(enamel) + np.median(dentin))
    above = volume > threshold
    share = float(np.count_nonzero(above & ~tooth) / max(np.count_nonzero(above), 1))
    return bright >= 10, share


def measure(difficulty: str, jobs: list, shape: tuple[int, int, int]) -> dict:
    complete, bright, shares, seconds, cpu = [], [], [], [], []
    molar_cases, molar_classes, situations, metal_cases = 0, Counter(), Counter(), 0
    for _, case_id, case_seed, incomplete in jobs:
        start, start_cpu = time.perf_counter(), time.process_time()
        case, tissue, meta = generate_phantom(seed=case_seed, shape=shape, incomplete=incomplete, case_id=case_id,
                                              difficulty=difficulty, return_tissue=True, return_meta=True)  # fmt: skip
        seconds.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
        if case.is_complete:
            complete.append(case.landmarks * case.spacing)
        b, share = threshold_measures(case.volume, tissue)
        bright.append(b)
        shares.append(share)
        classes = [c for c in meta.get("third_molars", {}).values() if c in THIRD_MOLAR_CLASSES]
        molar_classes.update(classes)
        molar_cases += any(c != "erupted" for c in classes)
        situations.update(meta.get("situations", []))
        metal_cases += bool((tissue == Tissue.METAL).any())
    n = len(jobs)
    return {
        "difficulty": difficulty,
        "cases": n,
        "complete_cases": len(complete),
        "procrustes_residual_mm": procrustes_residual(np.stack(complete)) if len(complete) > 2 else float("nan"),
        "brighter_than_enamel_share": float(np.mean(bright)),
        "metal_share": metal_cases / n,
        "non_tooth_above_threshold_share": float(np.mean(shares)),
        "third_molar_impacted_or_tilted_share": molar_cases / n,
        "third_molar_classes": dict(molar_classes),
        "situations": {k: situations.get(k, 0) for k in SITUATIONS},
        "seconds_per_case": float(np.mean(seconds)),
        "seconds_max": float(np.max(seconds)),
        "cpu_seconds_per_case": float(np.mean(cpu)),
        "cpu_seconds_max": float(np.max(cpu)),
    }


def table(results: list[dict]) -> str:
    rows = [
        ("cases (complete)", lambda r: f"{r['cases']} ({r['complete_cases']})"),
        ("Procrustes residual, mm (target 2–4)", lambda r: f"{r['procrustes_residual_mm']:.2f}"),
        ("cases with non-tooth brighter than enamel (≥ 25 %)",
         lambda r: f"{100 * r['brighter_than_enamel_share']:.0f} %"),
        ("cases with metal in view", lambda r: f"{100 * r['metal_share']:.0f} %"),
        ("non-tooth share above the enamel threshold (≥ 10 %)",
         lambda r: f"{100 * r['non_tooth_above_threshold_share']:.1f} %"),
        ("cases with an impacted or tilted third molar (≥ 33 %)",
         lambda r: f"{100 * r['third_molar_impacted_or_tilted_share']:.0f} %"),
        ("third-molar classes (sides)",
         lambda r: ", ".join(f"{k} {v}" for k, v in sorted(r["third_molar_classes"].items())) or "–"),
        ("cases per missing-tooth situation", lambda r: ", ".join(f"{k} {v}" for k, v in r["situations"].items())),
        ("wall seconds per case, one thread (max)", lambda r: f"{r['seconds_per_case']:.2f} ({r['seconds_max']:.2f})"),
        ("CPU seconds per case, one thread (max)",
         lambda r: f"{r['cpu_seconds_per_case']:.2f} ({r['cpu_seconds_max']:.2f})"),
    ]  # fmt: skip
    lines = ["| measure | " + " | ".join(r["difficulty"] for r in results) + " |",
             "|---|" + "---|" * len(results)]  # fmt: skip
    for name, cell in rows:
        lines.append(f"| {name} | " + " | ".join(cell(r) for r in results) + " |")
    return "\n".join(lines)


def checks(results: list[dict]) -> list[str]:
    """One line per target for each v2 result (``PASS`` / ``FAIL`` and the value), and v2 against v1 when both ran."""
    lines = []
    by_difficulty = {r["difficulty"]: r for r in results}
    r = by_difficulty.get("v2")
    if r is not None:

        def verdict(ok: bool) -> str:
            return "PASS" if ok else "FAIL"

        residual = r["procrustes_residual_mm"]
        lo, hi = RESIDUAL_MM
        lines.append(f"target: v2 Procrustes residual in {lo:g}–{hi:g} mm: {verdict(lo <= residual <= hi)} "
                     f"({residual:.2f} mm)")  # fmt: skip
        for key, target, what in (
            ("brighter_than_enamel_share", BRIGHT_SHARE, "v2 cases with non-tooth brighter than enamel"),
            ("non_tooth_above_threshold_share", NON_TOOTH_SHARE, "v2 non-tooth share above the enamel threshold"),
            ("third_molar_impacted_or_tilted_share", MOLAR_SHARE, "v2 cases with an impacted or tilted third molar"),
        ):
            lines.append(f"target: {what} ≥ {100 * target:.0f} %: {verdict(r[key] >= target)} ({100 * r[key]:.1f} %)")
        counts = r["situations"]
        lines.append(
            f"target: every missing-tooth situation occurs in v2: {verdict(min(counts.values()) > 0)} "
            f"({min(counts.values())} to {max(counts.values())} cases each)"
        )
        lines.append(
            f"target: v2 CPU seconds per case, one thread, ≤ {SECONDS_BUDGET:g} s: "
            f"{verdict(r['cpu_seconds_max'] <= SECONDS_BUDGET)} (mean {r['cpu_seconds_per_case']:.2f} s, "
            f"max {r['cpu_seconds_max']:.2f} s)"
        )
        v1 = by_difficulty.get("v1")
        if v1 is not None:
            lines.append(
                f"v2 against v1: Procrustes residual ×{residual / v1['procrustes_residual_mm']:.1f}, CPU seconds per "
                f"case ×{r['cpu_seconds_per_case'] / v1['cpu_seconds_per_case']:.2f}"
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=2026, help="master seed of the dataset (a fresh one)")
    parser.add_argument("--cases", type=int, default=50, help="number of cases")
    parser.add_argument("--shape", type=int, nargs=3, default=list(DEFAULT_SHAPE), metavar=("D", "H", "W"))
    parser.add_argument("--difficulty", choices=["v1", "v2", "both"], default="both")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    add_save_option(parser)
    args = parser.parse_args()
    with saved_report(args.save):
        _benchmark(args)


def _benchmark(args: argparse.Namespace) -> None:
    """Measure every difficulty asked for; print the header, the table and the target lines (the report)."""
    jobs = _dataset_jobs(args.seed, {"train": args.cases, "val": 0, "test": 0}, 0.3)
    shape = tuple(args.shape)
    difficulties = ["v1", "v2"] if args.difficulty == "both" else [args.difficulty]
    start = time.time()
    results = [measure(d, jobs, shape) for d in difficulties]
    load = os.getloadavg()
    print(f"# phantom difficulty — {datetime.date.today().isoformat()}: seed {args.seed}, {args.cases} cases of "
          f"{shape}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, {os.cpu_count()} CPUs, load average "
          f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}, {time.time() - start:.0f} s in all\n")  # fmt: skip
    print(table(results))
    lines = checks(results)
    if lines:
        print()
        for line in lines:
            print(f"- {line}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"seed": args.seed, "shape": list(shape), "load_average": load, "results": results}, handle,
                      indent=1)  # fmt: skip


if __name__ == "__main__":
    main()
