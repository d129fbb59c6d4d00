"""Reference predictions for a single-atlas evaluation: what a model must beat, and the floor it cannot go below.

Both are scored exactly like a trained model (:func:`h3de_lite.evaluation.evaluate`): the same folder of images and
landmark files (:func:`~h3de_lite.evaluation.find_cases`, e.g. written by
:func:`~h3de_lite.data.atlas.write_rigid_copies`), the same labels read from disk, radial errors in each stored
volume's spacing, the same summary (:func:`~h3de_lite.evaluation.summarize_cases`).

- **Identity baseline** (:func:`identity_reference`): predict the template's own fiducials (world mm) in every image,
  ignoring how the head moved. Its error is the motion itself: what a detector that memorised the template's grid
  would score.
- **Known-transform atlas** (:func:`known_transform_reference`): push the template's fiducials through the *true*
  transform of each copy (``transforms.json``), i.e. a perfect registration of the single atlas, then express the
  result the way a heatmap model at the working resolution must: a Gaussian heatmap (eq. 1) on the working grid of
  the copy, decoded (eq. 2, arg-max or sub-voxel) and mapped back to the stored voxels. Against labels that are
  themselves the transformed template fiducials, this is the floor of a single-atlas heatmap method at that
  resolution: the cost of the working grid and of the decoder, nothing else.

Explained in notebooks/09_real_anatomy.ipynb.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from h3de_lite.data.atlas import read_rigid_transforms, working_grid
from h3de_lite.data.case import Case
from h3de_lite.data.nifti import voxel_to_world, world_to_voxel
from h3de_lite.evaluation import CaseResult, EvaluationResult, find_cases, summarize_cases
from h3de_lite.heatmaps import decode, gaussian_heatmaps
from h3de_lite.metrics import radial_errors

__all__ = [
    "ATLAS_THRESHOLDS_MM",
    "score_coordinates",
    "identity_reference",
    "known_transform_reference",
    "comparison_table",
    "per_landmark_table",
]

ATLAS_THRESHOLDS_MM: tuple[float, ...] = (2.0, 4.0, 8.0)
"""SDR radii of the single-atlas evaluation (``h3de-lite evaluate --sdr 2 4 8``)."""


def score_coordinates(
    cases: Sequence[Case],
    coords: Sequence[np.ndarray],
    *,
    names: Sequence[str],
    source: str,
    thresholds: Sequence[float] = ATLAS_THRESHOLDS_MM,
) -> EvaluationResult:
    """Score given voxel coordinates (every landmark predicted present) as :func:`~h3de_lite.evaluation.evaluate`
    scores a model's.

    Args:
        cases: the labelled cases.
        coords: one ``(L, 3)`` array per case, voxel coordinates of that case's stored volume.
        names: landmark names.
        source: the row label of the tables.
        thresholds: SDR radii in mm.

    Shape:
        coords: each ``(L, 3)``.

    Example:
        >>> case = Case(volume=np.zeros((8, 8, 8)), landmarks=[[2.0, 2.0, 2.0]], spacing=[1, 1, 1], names=("a",))
        >>> score_coordinates([case], [np.array([[2.0, 2.0, 5.0]])], names=("a",), source="x").summary["all"]["mre"]
        3.0
    """
    if len(cases) != len(coords):
        raise ValueError(f"{len(cases)} cases but {len(coords)} coordinate arrays; give one (L, 3) array per case")
    results = []
    for case, c in zip(cases, coords, strict=True):
        c = np.asarray(c, dtype=np.float64)
        if c.shape != case.landmarks.shape:
            raise ValueError(f"case {case.case_id!r}: coordinates {c.shape} do not match labels {case.landmarks.shape}")
        present = np.ones(len(c), dtype=bool)
        results.append(CaseResult(
            case_id=case.case_id, coords=c, world=voxel_to_world(c, case.affine), present=present,
            score=np.ones(len(c)), truth=case.landmarks.copy(), true_present=case.present,
            errors=np.asarray(radial_errors(c, case.landmarks, case.spacing), dtype=np.float64),
            spacing=case.spacing.copy(),
        ))  # fmt: skip
    thresholds = tuple(float(t) for t in thresholds)
    names = tuple(names)
    return EvaluationResult(cases=results, summary=summarize_cases(results, names=names, thresholds=thresholds),
                            names=names, thresholds=thresholds, source=source)  # fmt: skip


def _cases(data: str | Path, split: str, names: Sequence[str]) -> list[Case]:
    return [files.load(tuple(names)) for files in find_cases(data, split)]


def identity_reference(
    data: str | Path,
    template: Case,
    *,
    split: str = ".",
    thresholds: Sequence[float] = ATLAS_THRESHOLDS_MM,
) -> EvaluationResult:
    """The identity baseline: the template's fiducials, in world mm, predicted for every image of ``data / split``.

    Args:
        data: evaluation folder (:func:`~h3de_lite.evaluation.find_cases`).
        template: the annotated template (its landmarks, names and affine).
        split: sub-folder (``"."``: ``data`` itself).
        thresholds: SDR radii in mm.

    Shape:
        not a tensor function.

    Example:
        >>> identity_reference("data/afids-test", template.case).summary["all"]["mre"]  # doctest: +SKIP
        24.1
    """
    world = voxel_to_world(template.landmarks, template.affine)
    cases = _cases(data, split, template.names)
    coords = [world_to_voxel(world, case.affine) for case in cases]
    return score_coordinates(cases, coords, names=template.names, source="identity (template coordinates)",
                             thresholds=thresholds)  # fmt: skip


def known_transform_reference(
    data: str | Path,
    template: Case,
    *,
    spacing: float | None,
    sigma: float = 2.0,
    method: str = "subvoxel",
    split: str = ".",
    thresholds: Sequence[float] = ATLAS_THRESHOLDS_MM,
) -> EvaluationResult:
    """The known-transform atlas: true transform of each copy applied to the template's fiducials, then rendered as a
    Gaussian heatmap on the copy's working grid and decoded, as a heatmap model at ``spacing`` would report it.

    Per case: ``F`` from ``transforms.json`` (:func:`~h3de_lite.data.atlas.read_rigid_transforms`) takes the
    template's world fiducials into the copy; the copy's inverse affine gives stored voxels; the resampling map of
    :func:`~h3de_lite.data.transforms.resample` (``(x + 0.5) f - 0.5``) gives working-grid voxels; a heatmap of
    ``sigma`` voxels (eq. 1) is decoded with ``method`` (eq. 2) and mapped back (``to_source_voxels``).

    Args:
        data: evaluation folder holding ``transforms.json``.
        template: the annotated template.
        spacing: working voxel size in mm; ``None``: the stored grid.
        sigma: heatmap standard deviation in working voxels (the training ``sigma``).
        method: ``"subvoxel"`` or ``"argmax"``.
        split: sub-folder.
        thresholds: SDR radii in mm.

    Raises:
        FileNotFoundError: no ``transforms.json``.
        ValueError: a case without a transform.

    Shape:
        not a tensor function.

    Example:
        >>> known_transform_reference("afids-test", template.case, spacing=3.0).summary["all"]["mre"]  # doctest: +SKIP
        0.05
    """
    if method not in ("subvoxel", "argmax"):
        raise ValueError(f"method must be 'subvoxel' or 'argmax', got {method!r}")
    folder = Path(data) / split
    transforms = read_rigid_transforms(folder)
    world = voxel_to_world(template.landmarks, template.affine)
    cases = _cases(data, split, template.names)
    coords = []
    for case in cases:
        if case.case_id not in transforms:
            raise ValueError(f"{str(folder / 'transforms.json')!r} has no transform for case {case.case_id!r}")
        m = transforms[case.case_id]
        stored = world_to_voxel(world @ m[:3, :3].T + m[:3, 3], case.affine)
        if spacing is None:
            shape, factor = case.volume.shape, np.ones(3)
        else:
            shape, _ = working_grid(case, spacing)
            factor = np.asarray(shape, dtype=np.float64) / np.asarray(case.volume.shape, dtype=np.float64)
        grid = (stored + 0.5) * factor - 0.5
        heatmaps = gaussian_heatmaps(torch.as_tensor(grid[None], dtype=torch.float32), shape, sigma)
        decoded = decode(heatmaps, method)[0].double().numpy()
        coords.append((decoded + 0.5) / factor - 0.5)
    label = f"known transform ({'stored grid' if spacing is None else f'{spacing:g} mm'}, {method})"
    return score_coordinates(cases, coords, names=template.names, source=label, thresholds=thresholds)


# ---------------------------------------------------------------------------------------------------- tables
def _cell(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


Results = Mapping[str, "EvaluationResult | Mapping[str, Any]"] | Sequence[EvaluationResult]


def _all_cases(results: Results) -> list[tuple[str, dict[str, Any], tuple[str, ...]]]:
    """``(label, summary of all cases, names)`` per result; a result may be an :class:`EvaluationResult` or the
    summary ``h3de-lite evaluate`` writes (``eval*.json``: ``{"complete", "incomplete", "all"}``)."""
    items = list(results.items()) if isinstance(results, Mapping) else [(r.source, r) for r in results]
    if not items:
        raise ValueError("no results to tabulate")
    out = []
    for label, result in items:
        summary = result.summary if isinstance(result, EvaluationResult) else result
        if "all" not in summary:
            raise ValueError(f"result {label!r} is neither an EvaluationResult nor an evaluate summary (no 'all' key)")
        names = tuple(summary["all"].get("per_landmark") or ())
        out.append((str(label), summary["all"], names))
    return out


def comparison_table(results: Results) -> str:
    """One Markdown row per result (label, cases, MRE ± SD, SDR at its radii, worst fiducial), all cases.

    Args:
        results: ``{label: result}`` (an :class:`~h3de_lite.evaluation.EvaluationResult` or the JSON summary
            ``h3de-lite evaluate`` writes), or results labelled by their ``source``; the first one's SDR radii are
            the columns.

    Shape:
        not a tensor function.

    Example:
        >>> case = Case(volume=np.zeros((8, 8, 8)), landmarks=[[2.0, 2.0, 2.0]], spacing=[1, 1, 1], names=("a",))
        >>> r = score_coordinates([case], [np.array([[2.0, 2.0, 5.0]])], names=("a",), source="x")
        >>> comparison_table([r]).splitlines()[2]
        '| x | 1 | 3.00 ± 0.00 | 0.0 | 100.0 | 100.0 | a (3.00) |'
    """
    items = _all_cases(results)
    keys = list(items[0][1].get("sdr") or {})
    head = ["Method", "Cases", "MRE ± SD (mm)", *(f"SDR {float(k):g} mm (%)" for k in keys), "Worst fiducial (mm)"]
    lines = ["| " + " | ".join(head) + " |",
             "|" + "|".join(["---", "---:", "---:", *("---:" for _ in keys), "---"]) + "|"]  # fmt: skip
    for label, s, _ in items:
        sdr = s.get("sdr") or {}
        per = {n: v["mre"] for n, v in (s.get("per_landmark") or {}).items() if v.get("mre") is not None}
        worst = max(per, key=per.get) if per else None
        lines.append("| " + " | ".join([
            label, str(s["n_cases"]), f"{_cell(s['mre'], 2)} ± {_cell(s['std'], 2)}",
            *(_cell(sdr.get(k), 1) for k in keys),
            f"{worst} ({per[worst]:.2f})" if worst else "n/a",
        ]) + " |")  # fmt: skip
    return "\n".join(lines)


def per_landmark_table(results: Results) -> str:
    """Markdown: one row per landmark, its MRE (mm) under each result, all cases (results as in
    :func:`comparison_table`).

    Shape:
        not a tensor function.
    """
    items = _all_cases(results)
    names = items[0][2]
    lines = ["| Fiducial | " + " | ".join(label for label, _, _ in items) + " |",
             "|---|" + "|".join("---:" for _ in items) + "|"]  # fmt: skip
    for name in names:
        cells = [_cell(((s.get("per_landmark") or {}).get(name) or {}).get("mre"), 2) for _, s, _ in items]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
