"""Figures and viewers for CT volumes with landmarks: slices, projections, error plots and interactive 3D views.

Every picture follows the paper's Fig. 4 convention: **ground truth in green, prediction in red**
(:data:`TRUTH_COLOR`, :data:`PREDICTION_COLOR`). Coordinates are voxel indices in array-axis order, ``(L, 3)``
arrays with ``NaN`` rows for missing landmarks, as everywhere in the package; spacing ``(3,)`` is in mm.

- Slices and projections (matplotlib): :func:`plot_orthogonal_slices` (three planes through a point),
  :func:`plot_mips` (maximum-intensity projections), :func:`plot_worst_cases` (the largest errors, as images).
- Evaluation plots (matplotlib): :func:`plot_error_distributions` (per-landmark box or violin plots),
  :func:`plot_sdr_curves` (SDR against the radius, from :func:`sdr_curve`), :func:`plot_existence_pr` (existence
  precision–recall as the threshold moves, from :func:`existence_pr_curve`); :func:`worst_landmarks` ranks errors.
- Interactive (optional packages, imported when called): :func:`volume_figure_3d` (plotly: surfaces of bone and
  teeth with the landmarks as markers; :func:`setup_plotly` picks a renderer that works in Jupyter, Colab and the
  static book), :func:`slice_browser` (ipywidgets: always-available fallback) and :func:`view_itk` (itkwidgets, for
  readers who install it; never run in CI or the book build).

No paper equation lives here: these are tools for looking at data and results.

Explained in notebooks/08_visualization.ipynb (slices, MIPs, 3D, browsers) and notebooks/07_evaluation.ipynb
(errors, SDR, existence, worst cases).
"""

from __future__ import annotations

import importlib
import io
import math
import os
import sys
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import matplotlib.pyplot as plt
import numpy as np
from matplotlib import patheffects, ticker
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from h3de_lite.metrics import DEFAULT_THRESHOLDS_MM, existence_scores

if TYPE_CHECKING:  # optional packages: imported inside the functions that need them
    import plotly.graph_objects as go

__all__ = [
    "PREDICTION_COLOR",
    "TRUTH_COLOR",
    "existence_pr_curve",
    "existence_pr_curve_at",
    "plot_error_distributions",
    "plot_existence_pr",
    "plot_mips",
    "plot_orthogonal_slices",
    "plot_sdr_curves",
    "plot_worst_cases",
    "sdr_curve",
    "setup_plotly",
    "slice_browser",
    "view_itk",
    "volume_figure_3d",
    "worst_landmarks",
]

TRUTH_COLOR: str = "#2ca02c"
"""Ground truth: green (paper Fig. 4)."""
PREDICTION_COLOR: str = "#d62728"
"""Prediction: red (paper Fig. 4)."""

_WINDOW: tuple[float, float] = (-200.0, 2500.0)  # soft tissue to enamel, HU
# (fixed axis, horizontal axis, vertical axis, name) of each plane
_PANELS: dict[str, tuple[int, int, int]] = {"axial": (2, 0, 1), "coronal": (1, 0, 2), "sagittal": (0, 1, 2)}
_AXIS_LABELS = ("axis 0 (L → R)", "axis 1 (P → A)", "axis 2 (I → S)")
_OUTLINE = [patheffects.withStroke(linewidth=2.2, foreground="black")]
_MODEL_COLORS = ("#1f77b4", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f")


# ---------------------------------------------------------------------------------------------------- checks
def _volume3(volume: Any) -> np.ndarray:
    array = np.asarray(volume)
    if array.ndim != 3:
        raise ValueError(f"volume must be 3D (D, H, W), got shape {array.shape}")
    return array


def _spacing3(spacing: Any) -> np.ndarray:
    if spacing is None:
        return np.ones(3)
    out = np.asarray(spacing, dtype=np.float64).reshape(-1)
    if out.shape != (3,) or not np.all(np.isfinite(out)) or np.any(out <= 0):
        raise ValueError(f"spacing must be three positive numbers in mm, got {spacing!r}")
    return out


def _window(window: Sequence[float]) -> tuple[float, float]:
    if len(window) != 2 or not window[0] < window[1]:
        raise ValueError(f"window must be (low, high) with low < high, got {window!r}")
    return float(window[0]), float(window[1])


def _points(points: Any, what: str, n: int | None = None) -> np.ndarray | None:
    if points is None:
        return None
    out = np.asarray(points, dtype=np.float64)
    if out.ndim != 2 or out.shape[1] != 3:
        raise ValueError(f"{what} must have shape (L, 3) voxel coordinates, got {out.shape}")
    if n is not None and len(out) != n:
        raise ValueError(f"{what} has {len(out)} rows but the other landmark array has {n}; pass one row per landmark")
    return out


def _landmark_arrays(truth: Any, prediction: Any, names: Sequence[str] | None) -> tuple[Any, Any, list[str]]:
    """Checked ``truth``/``prediction`` ``(L, 3)`` arrays (either may be ``None``) and ``L`` names."""
    truth = _points(truth, "truth")
    prediction = _points(prediction, "prediction", None if truth is None else len(truth))
    n = len(truth) if truth is not None else (len(prediction) if prediction is not None else 0)
    if names is None:
        names = [str(i) for i in range(n)]
    names = [str(name) for name in names]
    if (truth is not None or prediction is not None) and len(names) != n:
        raise ValueError(f"names has {len(names)} entries but the landmark arrays have {n} rows")
    return truth, prediction, names


def _error_sets(errors: Any, what: str = "errors") -> dict[str, np.ndarray]:
    """``{label: (N, L) errors}`` from one array (label ``""``) or a mapping of arrays."""
    items = errors.items() if isinstance(errors, Mapping) else [("", errors)]
    out = {}
    for label, value in items:
        array = np.asarray(value, dtype=np.float64)
        if array.ndim == 1:
            array = array[None]
        if array.ndim != 2:
            raise ValueError(f"{what} must have shape (N, L) (cases × landmarks) or (L,), got {array.shape}")
        if np.any(array[~np.isnan(array)] < 0):
            raise ValueError(f"{what} must be non-negative distances in mm (NaN where not measured)")
        out[str(label)] = array
    if not out:
        raise ValueError(f"{what} is empty; pass an (N, L) array or a mapping of them")
    widths = {a.shape[1] for a in out.values()}
    if len(widths) != 1:
        raise ValueError(f"every {what} array needs the same number of landmarks, got {sorted(widths)}")
    return out


def _finite(point: np.ndarray | None) -> bool:
    return point is not None and bool(np.all(np.isfinite(point)))


# ---------------------------------------------------------------------------------------------------- drawing
def _place_labels(ax: Axes, anchors: list[tuple[float, float]], texts: list[str], colors: list[str]) -> None:
    """Label each anchor (data coordinates) with a greedy offset so that no two labels sit on top of each other.

    Candidate offsets (points) ring the anchor at growing radii; the first whose label box (approximated in display
    pixels) is free wins, and a long offset gets a thin leader line.
    """
    if not anchors:
        return
    if ax.figure.get_layout_engine() is not None:
        ax.figure.draw_without_rendering()  # settle the layout first: pixel positions are final (up to a title)
    fontsize = 8.0
    dpi_scale = ax.figure.dpi / 72.0
    placed: list[tuple[float, float, float, float]] = []  # x0, y0, x1, y1 in display pixels
    candidates = [(4, 4), (4, -11), (-4, 4), (-4, -11)]
    for radius in (14, 24, 36):
        candidates += [(radius * math.cos(a), radius * math.sin(a)) for a in np.linspace(0, 2 * math.pi, 12, False)]
    order = np.argsort([-y for _, y in anchors], kind="stable")
    for i in order:
        x, y = ax.transData.transform(anchors[i])
        width = (0.62 * fontsize * len(texts[i]) + 2) * dpi_scale
        height = (fontsize + 2) * dpi_scale
        chosen = candidates[0]
        for dx, dy in candidates:
            left = x + dx * dpi_scale - (width if dx < 0 else 0)
            box = (left, y + dy * dpi_scale, left + width, y + dy * dpi_scale + height)
            if not any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in placed):
                chosen = (dx, dy)
                placed.append(box)
                break
        else:
            left = x + chosen[0] * dpi_scale
            placed.append((left, y, left + width, y + height))
        far = math.hypot(*chosen) > 10
        ax.annotate(
            texts[i],
            anchors[i],
            xytext=chosen,
            textcoords="offset points",
            ha="right" if chosen[0] < 0 else "left",
            va="bottom",
            color=colors[i],
            fontsize=fontsize,
            fontweight="bold",
            path_effects=_OUTLINE,
            arrowprops={"arrowstyle": "-", "color": colors[i], "lw": 0.6} if far else None,
            gid=f"label:{texts[i]}",
        )


def _image_panel(ax: Axes, image: np.ndarray, *, horizontal: int, vertical: int, spacing: np.ndarray,
                 window: tuple[float, float], cmap: str) -> None:  # fmt: skip
    """Draw a 2D array whose axes are (horizontal, vertical) array axes, rows = vertical, physical aspect."""
    ax.imshow(
        image.T,
        cmap=cmap,
        vmin=window[0],
        vmax=window[1],
        origin="lower",
        aspect=spacing[vertical] / spacing[horizontal],
        interpolation="nearest",
    )
    ax.set_xlabel(_AXIS_LABELS[horizontal], fontsize=9)
    ax.set_ylabel(_AXIS_LABELS[vertical], fontsize=9)
    ax.tick_params(labelsize=8)


def _overlay(
    ax: Axes,
    *,
    truth: np.ndarray | None,
    prediction: np.ndarray | None,
    names: Sequence[str],
    horizontal: int,
    vertical: int,
    keep: np.ndarray,
    pairs: bool = False,
    labels: bool = True,
) -> None:
    """Truth (green circles) and prediction (red crosses) of the landmarks where ``keep`` holds (``(L,)``, or
    ``(L, 2)`` for truth and prediction separately); each landmark named once, at its truth when drawn, else at its
    prediction."""
    keep = keep if keep.ndim == 2 else np.stack([keep, keep], axis=1)  # (L, 2): truth, prediction
    anchors, texts, colors = [], [], []
    for i, name in enumerate(names):
        t = truth[i] if truth is not None and keep[i, 0] and _finite(truth[i]) else None
        p = prediction[i] if prediction is not None and keep[i, 1] and _finite(prediction[i]) else None
        if t is not None:
            ax.plot(t[horizontal], t[vertical], "o", ms=6, mfc="none", mec=TRUTH_COLOR, mew=1.8, gid=f"truth:{name}")
        if p is not None:
            ax.plot(p[horizontal], p[vertical], "x", ms=6, color=PREDICTION_COLOR, mew=1.8, gid=f"prediction:{name}")
        if pairs and t is not None and p is not None:
            ax.plot([t[horizontal], p[horizontal]], [t[vertical], p[vertical]], "-", color="white", lw=0.7,
                    alpha=0.8, gid=f"pair:{name}")  # fmt: skip
        if labels and (t is not None or p is not None):
            where = t if t is not None else p
            anchors.append((where[horizontal], where[vertical]))
            texts.append(name)
            colors.append(TRUTH_COLOR if t is not None else PREDICTION_COLOR)
    _place_labels(ax, anchors, texts, colors)


def _legend_handles(truth: bool, prediction: bool) -> list[Line2D]:
    handles = []
    if truth:
        handles.append(Line2D([], [], marker="o", ls="", mfc="none", mec=TRUTH_COLOR, mew=1.8, label="ground truth"))
    if prediction:
        handles.append(Line2D([], [], marker="x", ls="", color=PREDICTION_COLOR, mew=1.8, label="prediction"))
    return handles


def _near_plane(
    points: np.ndarray | None, fixed: int, index: int, spacing: np.ndarray, tol: float, n: int
) -> np.ndarray:
    if points is None:
        return np.zeros(n, dtype=bool)
    with np.errstate(invalid="ignore"):
        return np.abs(points[:, fixed] - index) * spacing[fixed] <= tol


# ---------------------------------------------------------------------------------------------------- slices
def plot_orthogonal_slices(
    volume: np.ndarray,
    *,
    center: Sequence[float],
    landmarks: np.ndarray | None = None,
    prediction: np.ndarray | None = None,
    names: Sequence[str] | None = None,
    spacing: Sequence[float] | None = None,
    window: tuple[float, float] = _WINDOW,
    axes: Sequence[Axes] | None = None,
    title: str | None = None,
    tolerance_mm: float = 3.0,
    cmap: str = "gray",
) -> Figure:
    """Axial, coronal and sagittal slices through ``center``, with the landmarks near each slice marked and named.

    Each panel shows the plane through ``round(center)`` perpendicular to one array axis: axial (axis 2 fixed; axis 0
    across, axis 1 up), coronal (axis 1 fixed; axis 0 across, axis 2 up) and sagittal (axis 0 fixed; axis 1 across,
    axis 2 up), so "up" is anterior in the axial panel and superior in the others. Pixels keep their physical aspect
    ratio from ``spacing``. A landmark is drawn on a panel when it lies within ``tolerance_mm`` of that plane
    (projected onto it): ground truth ``landmarks`` as green circles, ``prediction`` as red crosses (paper Fig. 4);
    ``NaN`` rows (missing landmarks) are skipped. A new figure is a 2 × 2 grid whose fourth cell holds the legend,
    so it fits a book page.

    Args:
        volume: ``(D, H, W)`` intensities (HU or normalised).
        center: ``(3,)`` voxel coordinates of the point the three planes go through (e.g. a landmark).
        landmarks: ``(L, 3)`` ground-truth voxel coordinates, ``NaN`` rows for missing landmarks.
        prediction: ``(L, 3)`` predicted voxel coordinates, ``NaN`` rows for landmarks predicted absent.
        names: one label per landmark row (e.g. ``LANDMARK_NAMES``); rows are numbered when ``None``.
        spacing: ``(3,)`` voxel size in mm; isotropic 1 mm when ``None``.
        window: display range ``(low, high)`` of intensities (default: soft tissue to enamel in HU).
        axes: three matplotlib axes to draw into; a new 2 × 2 figure when ``None``.
        title: figure title.
        tolerance_mm: how far from a plane a landmark may lie and still be drawn on it.
        cmap: matplotlib colour map of the image.

    Returns:
        The figure holding the axes.

    Raises:
        ValueError: ``volume`` not 3D, a ``center``/``spacing``/``landmarks``/``prediction``/``names``/``window``/
            ``axes`` of the wrong size, or a ``center`` outside the volume.

    Shape:
        - volume ``(D, H, W)``; center ``(3,)``; landmarks, prediction ``(L, 3)``; spacing ``(3,)``.

    Example:
        >>> import matplotlib; matplotlib.use("Agg")
        >>> fig = plot_orthogonal_slices(np.zeros((32, 32, 16)), center=(16, 16, 8), spacing=(0.5, 0.5, 1.0))
        >>> [ax.get_title().split(":")[0] for ax in fig.axes[:3]]
        ['axial', 'coronal', 'sagittal']

    Explained in notebooks/02_data.ipynb and notebooks/08_visualization.ipynb.
    """
    volume = _volume3(volume)
    centre = np.asarray(center, dtype=np.float64).reshape(-1)
    if centre.shape != (3,) or not np.all(np.isfinite(centre)):
        raise ValueError(f"center must be three finite voxel coordinates, got {center!r}")
    shape = np.asarray(volume.shape)
    if np.any(centre < -0.5) or np.any(centre > shape - 0.5):
        raise ValueError(f"center {centre.tolist()} lies outside the volume of shape {tuple(volume.shape)}")
    index = np.clip(np.rint(centre).astype(int), 0, shape - 1)
    spacing_arr = _spacing3(spacing)
    window = _window(window)
    truth, pred, names = _landmark_arrays(landmarks, prediction, names)
    n = len(names)

    legend_ax = None
    if axes is None:
        fig, grid = plt.subplots(2, 2, figsize=(8.0, 7.2), constrained_layout=True)
        axes, legend_ax = [grid[0, 0], grid[0, 1], grid[1, 0]], grid[1, 1]
    else:
        axes = list(axes)
        if len(axes) != 3:
            raise ValueError(f"axes must hold three matplotlib axes, got {len(axes)}")
        fig = axes[0].figure

    for ax, label in zip(axes, ("axial", "coronal", "sagittal"), strict=True):
        fixed, horizontal, vertical = _PANELS[label]
        image = np.take(volume, index[fixed], axis=fixed)  # remaining axes in increasing order
        if horizontal > vertical:
            image = image.T
        _image_panel(ax, image, horizontal=horizontal, vertical=vertical, spacing=spacing_arr, window=window, cmap=cmap)
        ax.set_title(f"{label}: axis {fixed} = {index[fixed]}", fontsize=10)
        if n:
            keep = np.stack([_near_plane(truth, fixed, index[fixed], spacing_arr, tolerance_mm, n),
                             _near_plane(pred, fixed, index[fixed], spacing_arr, tolerance_mm, n)], axis=1)  # fmt: skip
            _overlay(ax, truth=truth, prediction=pred, names=names, horizontal=horizontal, vertical=vertical,
                     keep=keep)  # fmt: skip
    if legend_ax is not None:
        legend_ax.axis("off")
        handles = _legend_handles(truth is not None, pred is not None)
        if handles:
            legend_ax.legend(handles=handles, loc="center", fontsize=10, frameon=False,
                             title=f"within {tolerance_mm:g} mm of the plane", title_fontsize=9)  # fmt: skip
    if title is not None:
        fig.suptitle(title)
    return fig


def plot_mips(
    volume: np.ndarray,
    *,
    truth: np.ndarray | None = None,
    prediction: np.ndarray | None = None,
    names: Sequence[str] | None = None,
    spacing: Sequence[float] | None = None,
    window: tuple[float, float] | None = None,
    views: Sequence[str] = ("axial", "coronal"),
    pairs: bool = True,
    labels: bool = True,
    axes: Sequence[Axes] | None = None,
    title: str | None = None,
    cmap: str = "gray",
) -> Figure:
    """Maximum-intensity projections of the volume with every landmark projected onto them (paper Fig. 4 colours).

    A MIP keeps, along the projected axis, the brightest voxel: bone and teeth stand out of soft tissue, and every
    landmark is visible whatever its depth. ``"axial"`` projects along axis 2 (view from above), ``"coronal"`` along
    axis 1 (from the front), ``"sagittal"`` along axis 0 (from the side). Ground truth is a green circle, the
    prediction a red cross, joined by a thin white line (``pairs``): its length is the projected error. Two views
    make one row; more go on further rows.

    Args:
        volume: ``(D, H, W)`` intensities.
        truth: ``(L, 3)`` true voxel coordinates, ``NaN`` rows for missing landmarks.
        prediction: ``(L, 3)`` predicted voxel coordinates, ``NaN`` rows where predicted absent.
        names: landmark names (numbered when ``None``).
        spacing: ``(3,)`` voxel size in mm (physical aspect ratio); 1 mm when ``None``.
        window: display range of intensities; ``None``: from the 1st to the 99.5th percentile of each projection
            (a MIP is bright everywhere bone or metal lies on the ray, so a fixed CT window often saturates).
        views: projections to draw, among ``"axial"``, ``"coronal"``, ``"sagittal"``.
        pairs: join each truth to its prediction.
        labels: name the landmarks (once each, placed so that labels do not overlap).
        axes: one matplotlib axes per view; a new figure when ``None``.
        title: figure title.
        cmap: colour map.

    Returns:
        The figure.

    Raises:
        ValueError: bad volume, view names, landmark shapes, spacing, window or number of axes.

    Shape:
        volume ``(D, H, W)``; truth, prediction ``(L, 3)``; spacing ``(3,)``.

    Example:
        >>> import matplotlib; matplotlib.use("Agg")
        >>> fig = plot_mips(np.zeros((32, 32, 16)), truth=np.array([[8.0, 9.0, 4.0]]), names=["La"])
        >>> len(fig.axes)
        2
    """
    volume = _volume3(volume)
    spacing_arr = _spacing3(spacing)
    window = None if window is None else _window(window)
    views = list(views)
    unknown = [v for v in views if v not in _PANELS]
    if not views or unknown:
        raise ValueError(f"views must be among {list(_PANELS)}, got {views}")
    truth, pred, names = _landmark_arrays(truth, prediction, names)
    if axes is None:
        rows = math.ceil(len(views) / 2)
        cols = min(2, len(views))
        fig, grid = plt.subplots(rows, cols, figsize=(4.2 * cols, 4.4 * rows), constrained_layout=True, squeeze=False)
        flat = list(grid.ravel())
        for extra in flat[len(views):]:
            extra.remove()
        axes = flat[: len(views)]
    else:
        axes = list(axes)
        if len(axes) != len(views):
            raise ValueError(f"axes must hold one matplotlib axes per view ({len(views)}), got {len(axes)}")
        fig = axes[0].figure
    for ax, view in zip(axes, views, strict=True):
        fixed, horizontal, vertical = _PANELS[view]
        image = volume.max(axis=fixed)
        if horizontal > vertical:
            image = image.T
        shown = window or (float(np.percentile(image, 1.0)), float(np.percentile(image, 99.5)) + 1e-6)
        _image_panel(ax, image, horizontal=horizontal, vertical=vertical, spacing=spacing_arr, window=shown, cmap=cmap)
        ax.set_title(f"{view} MIP (max over axis {fixed})", fontsize=10)
        if names:
            _overlay(ax, truth=truth, prediction=pred, names=names, horizontal=horizontal, vertical=vertical,
                     keep=np.ones(len(names), dtype=bool), pairs=pairs, labels=labels)  # fmt: skip
    handles = _legend_handles(truth is not None, pred is not None)
    if handles:
        axes[0].legend(handles=handles, loc="lower left", fontsize=8, framealpha=0.8)
    if title is not None:
        fig.suptitle(title)
    return fig


# ---------------------------------------------------------------------------------------------------- worst cases
def worst_landmarks(errors: np.ndarray, *, k: int = 3) -> list[tuple[int, int, float]]:
    """The ``k`` largest radial errors as ``(case index, landmark index, error mm)``, largest first.

    ``NaN`` errors (missing in the truth or predicted absent: nothing measured) are never ranked.

    Args:
        errors: ``(N, L)`` radial errors in mm (e.g. ``np.stack([c.errors for c in result.cases])``).
        k: how many to return (fewer when fewer errors exist).

    Raises:
        ValueError: ``errors`` not 2D, negative errors, or ``k < 1``.

    Shape:
        errors ``(N, L)`` → list of ``min(k, #finite)`` triples.

    Example:
        >>> worst_landmarks(np.array([[1.0, np.nan], [5.0, 2.0]]), k=2)
        [(1, 0, 5.0), (1, 1, 2.0)]
    """
    array = _error_sets(errors)[""]
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    flat = np.where(np.isnan(array), -np.inf, array).ravel()
    order = np.argsort(-flat, kind="stable")[: min(k, int(np.isfinite(flat).sum()))]
    return [(int(i // array.shape[1]), int(i % array.shape[1]), float(flat[i])) for i in order]


def plot_worst_cases(
    volumes: Sequence[np.ndarray],
    *,
    truth: np.ndarray,
    prediction: np.ndarray,
    errors: np.ndarray,
    spacing: np.ndarray,
    names: Sequence[str],
    case_ids: Sequence[str] | None = None,
    k: int = 3,
    margin_mm: float = 15.0,
    window: tuple[float, float] = _WINDOW,
    cmap: str = "gray",
) -> Figure:
    """The ``k`` largest errors as images: one row each, the axial slice through the truth (left) and through the
    prediction (right).

    Both panels of a row show the same in-plane box (truth and prediction plus ``margin_mm``), so the two markers can
    be compared directly; a marker that lies off a panel's slice is drawn faded. The title gives case, landmark,
    error and how far apart the two slices are.

    Args:
        volumes: one ``(D_i, H_i, W_i)`` volume per case (shapes may differ).
        truth: ``(N, L, 3)`` true voxel coordinates of each case's volume.
        prediction: ``(N, L, 3)`` predicted voxel coordinates (``NaN`` where predicted absent).
        errors: ``(N, L)`` radial errors in mm, ``NaN`` where not measured (:func:`worst_landmarks` ranks them).
        spacing: ``(N, 3)`` voxel sizes in mm, or one ``(3,)`` for all cases.
        names: the ``L`` landmark names.
        case_ids: ``N`` case names for the titles (case indices when ``None``).
        k: number of rows.
        margin_mm: margin around the truth–prediction box.
        window: display range of intensities.
        cmap: colour map.

    Returns:
        The figure (a single "no measured error" panel when every error is ``NaN``).

    Raises:
        ValueError: inconsistent shapes.

    Shape:
        volumes ``N × (D, H, W)``; truth, prediction ``(N, L, 3)``; errors ``(N, L)``; spacing ``(N, 3)`` or ``(3,)``.

    Example:
        >>> import matplotlib; matplotlib.use("Agg")
        >>> t = np.array([[[10.0, 10.0, 5.0]]]); p = np.array([[[14.0, 10.0, 6.0]]])
        >>> fig = plot_worst_cases([np.zeros((32, 32, 16))], truth=t, prediction=p, errors=np.array([[4.1]]),
        ...                        spacing=np.ones(3), names=["La"], k=1)
        >>> len(fig.axes)
        2
    """
    window = _window(window)
    truth = np.asarray(truth, dtype=np.float64)
    prediction = np.asarray(prediction, dtype=np.float64)
    errors = np.asarray(errors, dtype=np.float64)
    n = len(volumes)
    if truth.ndim != 3 or truth.shape[0] != n or truth.shape[2] != 3 or prediction.shape != truth.shape:
        raise ValueError(f"truth and prediction must both have shape (N, L, 3) with N = {n} volumes, got "
                         f"{truth.shape} and {prediction.shape}")  # fmt: skip
    if errors.shape != truth.shape[:2]:
        raise ValueError(f"errors must have shape (N, L) = {truth.shape[:2]}, got {errors.shape}")
    if len(names) != truth.shape[1]:
        raise ValueError(f"names has {len(names)} entries for {truth.shape[1]} landmarks")
    spacing = np.asarray(spacing, dtype=np.float64)
    spacing = np.broadcast_to(spacing, (n, 3)) if spacing.shape == (3,) else spacing
    if spacing.shape != (n, 3):
        raise ValueError(f"spacing must have shape (3,) or (N, 3) = ({n}, 3), got {spacing.shape}")
    case_ids = [str(i) for i in range(n)] if case_ids is None else [str(c) for c in case_ids]
    if len(case_ids) != n:
        raise ValueError(f"case_ids has {len(case_ids)} entries for {n} volumes")
    ranked = worst_landmarks(errors, k=k)
    if not ranked:
        fig, ax = plt.subplots(figsize=(6.0, 1.5))
        ax.axis("off")
        ax.text(0.5, 0.5, "no measured error (every error is NaN)", ha="center", va="center")
        return fig
    fig, grid = plt.subplots(len(ranked), 2, figsize=(8.0, 3.9 * len(ranked)), constrained_layout=True,
                             squeeze=False)  # fmt: skip
    fixed, horizontal, vertical = _PANELS["axial"]
    for row, (c, j, err) in enumerate(ranked):
        volume = _volume3(volumes[c])
        s = spacing[c]
        t, p = truth[c, j], prediction[c, j]
        lo = np.minimum(t, p) - margin_mm / s
        hi = np.maximum(t, p) + margin_mm / s
        shape = np.asarray(volume.shape)
        lo = np.clip(np.floor(lo), 0, shape - 1).astype(int)
        hi = np.clip(np.ceil(hi), 0, shape - 1).astype(int)
        for col, (where, label) in enumerate(((t, "truth"), (p, "prediction"))):
            ax = grid[row, col]
            index = int(np.clip(np.rint(where[fixed]), 0, shape[fixed] - 1))
            image = volume[lo[0]: hi[0] + 1, lo[1]: hi[1] + 1, index]
            extent = (lo[horizontal] - 0.5, hi[horizontal] + 0.5, lo[vertical] - 0.5, hi[vertical] + 0.5)
            ax.imshow(image.T, cmap=cmap, vmin=window[0], vmax=window[1], origin="lower", extent=extent,
                      aspect=s[vertical] / s[horizontal], interpolation="nearest")  # fmt: skip
            markers = ((t, "o", TRUTH_COLOR, "truth"), (p, "x", PREDICTION_COLOR, "prediction"))
            for point, marker, color, what in markers:
                on_plane = abs(point[fixed] - index) * s[fixed] <= 1.5 * s[fixed]
                style = {"mfc": "none", "mec": color} if marker == "o" else {"color": color}
                ax.plot(point[horizontal], point[vertical], marker, ms=9, mew=2.0, alpha=1.0 if on_plane else 0.45,
                        gid=f"{what}:{case_ids[c]}:{names[j]}", **style)  # fmt: skip
            shift = "" if col == 0 else f", {(p[fixed] - t[fixed]) * s[fixed]:+.1f} mm from the truth's"
            ax.set_title(f"case {case_ids[c]} · {names[j]} · error {err:.1f} mm\n{label}'s slice (axis 2 = {index}"
                         f"{shift})", fontsize=9)  # fmt: skip
            ax.set_xlabel(_AXIS_LABELS[horizontal], fontsize=8)
            ax.set_ylabel(_AXIS_LABELS[vertical], fontsize=8)
            ax.tick_params(labelsize=7)
    grid[0, 0].legend(handles=_legend_handles(True, True), loc="lower left", fontsize=8, framealpha=0.8)
    return fig


# ---------------------------------------------------------------------------------------------------- error plots
def plot_error_distributions(
    errors: np.ndarray | Mapping[str, np.ndarray],
    *,
    names: Sequence[str],
    kind: str = "box",
    ax: Axes | None = None,
    title: str | None = None,
    log: bool = False,
) -> Figure:
    """Radial errors per landmark as box or violin plots, one group per landmark and one box per model.

    ``NaN`` errors (a landmark missing in the truth, or predicted absent) are left out, as in the MRE; a landmark with
    no measured error shows "n/a" instead of a box. Boxes: median line, quartile box, whiskers to 1.5 IQR, outliers
    as points. Violins (``kind="violin"``) show the density and the median; a group of one error is drawn as a point.

    Args:
        errors: ``(N, L)`` radial errors in mm (cases × landmarks), or ``{model name: (N, L)}`` for several models.
        names: the ``L`` landmark names (x axis).
        kind: ``"box"`` or ``"violin"``.
        ax: axes to draw into; a new book-width figure when ``None``.
        title: axes title.
        log: logarithmic error axis (for errors spanning decades, e.g. untrained models).

    Returns:
        The figure. Each median line carries ``gid="median:<model>:<landmark>"``.

    Raises:
        ValueError: bad shapes, negative errors, names of the wrong length or an unknown ``kind``.

    Shape:
        errors ``(N, L)`` per model; names ``L``.

    Example:
        >>> import matplotlib; matplotlib.use("Agg")
        >>> fig = plot_error_distributions(np.array([[1.0, 2.0], [3.0, np.nan]]), names=["La", "Lb"])
        >>> len(fig.axes)
        1
    """
    sets = _error_sets(errors)
    if kind not in ("box", "violin"):
        raise ValueError(f"kind must be 'box' or 'violin', got {kind!r}")
    n_landmarks = next(iter(sets.values())).shape[1]
    if len(names) != n_landmarks:
        raise ValueError(f"names has {len(names)} entries but errors have {n_landmarks} landmarks")
    if ax is None:
        fig, ax = plt.subplots(figsize=(8.0, 3.8), constrained_layout=True)
    else:
        fig = ax.figure
    models = list(sets)
    width = 0.8 / len(models)
    handles = []
    for m, (model, array) in enumerate(sets.items()):
        color = _MODEL_COLORS[m % len(_MODEL_COLORS)]
        for j in range(n_landmarks):
            values = array[:, j][~np.isnan(array[:, j])]
            x = j + (m - (len(models) - 1) / 2) * width
            if values.size == 0:
                ax.text(x, 0.02, "n/a", transform=ax.get_xaxis_transform(), ha="center", fontsize=7, rotation=90,
                        color=color)  # fmt: skip
                continue
            median = float(np.median(values))
            if kind == "box" or values.size < 2:
                if kind == "box":
                    parts = ax.boxplot(values, positions=[x], widths=width * 0.85, patch_artist=True,
                                       manage_ticks=False, flierprops={"markersize": 3, "markeredgecolor": color},
                                       medianprops={"color": "black", "lw": 1.2})  # fmt: skip
                    for patch in parts["boxes"]:
                        patch.set_facecolor(color)
                        patch.set_alpha(0.55)
                    parts["medians"][0].set_gid(f"median:{model}:{names[j]}")
                else:
                    ax.plot([x - width * 0.35, x + width * 0.35], [median, median], color="black", lw=1.2,
                            gid=f"median:{model}:{names[j]}")  # fmt: skip
                    ax.plot(x, values[0], "o", color=color, ms=3)
            else:
                parts = ax.violinplot(values, positions=[x], widths=width * 0.9, showextrema=False)
                for body in parts["bodies"]:
                    body.set_facecolor(color)
                    body.set_alpha(0.55)
                ax.plot([x - width * 0.3, x + width * 0.3], [median, median], color="black", lw=1.2,
                        gid=f"median:{model}:{names[j]}")  # fmt: skip
        handles.append(plt.Rectangle((0, 0), 1, 1, color=color, alpha=0.55, label=model or "errors"))
    ax.set_xticks(range(n_landmarks))
    ax.set_xticklabels(names, fontsize=9)
    ax.set_xlim(-0.6, n_landmarks - 0.4)
    ax.set_xlabel("landmark", fontsize=9)
    ax.set_ylabel("radial error (mm)", fontsize=9)
    ax.tick_params(axis="y", labelsize=8)
    if log:
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(ticker.NullFormatter())
    else:
        ax.set_ylim(bottom=0)
    ax.grid(axis="y", alpha=0.3)
    if len(models) > 1:
        ax.legend(handles=handles, fontsize=8, ncol=min(len(models), 3), loc="upper center",
                  bbox_to_anchor=(0.5, -0.16), frameon=False)  # below the axes: never over a box
    if title is not None:
        ax.set_title(title, fontsize=10)
    return fig


def sdr_curve(errors: np.ndarray, *, radii: Sequence[float]) -> np.ndarray:
    """Successful detection rate (%) at each radius: ``SDR_r = 100 · #{e ≤ r} / #e`` over the measured errors.

    The same definition as :func:`h3de_lite.metrics.summarize` (``NaN`` errors left out), evaluated at many radii.
    ``NaN`` everywhere when no error was measured.

    Args:
        errors: radial errors in mm, any shape, ``NaN`` where not measured.
        radii: radii in mm.

    Shape:
        errors ``(N, L)`` (any shape); radii ``(R,)`` → ``(R,)``.

    Example:
        >>> sdr_curve(np.array([[1.0, 3.0, np.nan]]), radii=[0.5, 2.0, 3.0])
        array([  0.,  50., 100.])
    """
    e = np.asarray(errors, dtype=np.float64).ravel()
    r = np.asarray(radii, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(r)) or np.any(r < 0):
        raise ValueError(f"radii must be finite and >= 0 mm, got {list(r)}")
    valid = e[~np.isnan(e)]
    if valid.size == 0:
        return np.full(r.shape, np.nan)
    return 100.0 * (valid[None, :] <= r[:, None]).mean(axis=1)


def plot_sdr_curves(
    errors: np.ndarray | Mapping[str, np.ndarray],
    *,
    radii: Sequence[float] | None = None,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS_MM,
    ax: Axes | None = None,
    title: str | None = None,
) -> Figure:
    """SDR (%) against the radius, one curve per model; the paper's radii (2, 2.5, 3, 4 mm) as dotted lines.

    The curve is the empirical distribution function of the radial errors: its value at 2 mm is the table's
    "SDR 2 mm", and a curve that stays left rises faster (more landmarks within a small radius).

    Args:
        errors: ``(N, L)`` radial errors in mm or ``{model name: (N, L)}``.
        radii: x values in mm (default 0 to 10 mm, or to the 95th percentile of the errors when that is larger).
        thresholds: radii marked by dotted lines.
        ax: axes to draw into; a new figure when ``None``.
        title: axes title.

    Returns:
        The figure; each curve is a line labelled with its model name (``gid="sdr:<model>"``).

    Shape:
        errors ``(N, L)`` per model.

    Example:
        >>> import matplotlib; matplotlib.use("Agg")
        >>> fig = plot_sdr_curves({"a": np.array([[1.0, 3.0]])})
        >>> [line.get_label() for line in fig.axes[0].get_lines() if line.get_gid()]
        ['a']
    """
    sets = _error_sets(errors)
    if radii is None:
        finite = np.concatenate([a[~np.isnan(a)] for a in sets.values()])
        top = max(10.0, float(np.percentile(finite, 95))) if finite.size else 10.0
        radii = np.linspace(0.0, top, 401)
    radii = np.asarray(radii, dtype=np.float64)
    if ax is None:
        fig, ax = plt.subplots(figsize=(6.0, 3.8), constrained_layout=True)
    else:
        fig = ax.figure
    for m, (model, array) in enumerate(sets.items()):
        curve = sdr_curve(array, radii=radii)
        n = int((~np.isnan(array)).sum())
        line = ax.plot(radii, curve, color=_MODEL_COLORS[m % len(_MODEL_COLORS)], lw=1.6, label=model or "errors",
                       gid=f"sdr:{model}")[0]  # fmt: skip
        line.set_label(model or "errors")
        if n == 0:
            line.set_label(f"{model or 'errors'} (no measured error)")
    for t in thresholds:
        ax.axvline(float(t), color="0.5", ls=":", lw=1.0)
    ax.set_xlim(float(radii[0]), float(radii[-1]))
    ax.set_ylim(0, 101)
    ax.set_xlabel("radius r (mm)", fontsize=9)
    ax.set_ylabel("SDR: errors ≤ r (%)", fontsize=9)
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right", framealpha=0.85)
    if title is not None:
        ax.set_title(title, fontsize=10)
    return fig


# ---------------------------------------------------------------------------------------------------- existence
def existence_pr_curve(
    scores: np.ndarray, true_present: np.ndarray, *, thresholds: Sequence[float] | None = None
) -> dict[str, np.ndarray]:
    """Existence precision, recall and F1 when a landmark is called present at ``score ≥ threshold``.

    The decoder's score (peak heatmap value, or the anchor head's highest existence probability, eq. 8) is compared
    with each threshold; :func:`h3de_lite.metrics.existence_scores` counts TP/FP/FN with "present" as the positive
    class. Precision is ``NaN`` where nothing is called present.

    Args:
        scores: ``(N, L)`` decoder scores (``CaseResult.score``), finite.
        true_present: ``(N, L)`` bool, the truth.
        thresholds: thresholds to sweep (default: every distinct score, so the curve has every operating point).

    Returns:
        ``{"threshold", "precision", "recall", "f1", "called"}``, arrays of the same length, thresholds increasing;
        ``called`` is the share of all landmarks called present (comparable between models whose scores live on
        different scales).

    Raises:
        ValueError: shapes differ, non-finite scores, or no threshold.

    Shape:
        scores, true_present ``(N, L)`` → arrays ``(T,)``.

    Example:
        >>> curve = existence_pr_curve(np.array([[0.9, 0.2]]), np.array([[True, False]]), thresholds=[0.1, 0.5])
        >>> curve["precision"].tolist(), curve["recall"].tolist()
        ([0.5, 1.0], [1.0, 1.0])
    """
    s = np.asarray(scores, dtype=np.float64)
    t = np.asarray(true_present, dtype=bool)
    if s.shape != t.shape:
        raise ValueError(f"scores and true_present must have the same shape, got {s.shape} and {t.shape}")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores must be finite numbers (the decoder's score of every landmark)")
    grid = np.unique(s) if thresholds is None else np.sort(np.asarray(thresholds, dtype=np.float64).reshape(-1))
    if grid.size == 0:
        raise ValueError("no threshold to sweep: pass thresholds or non-empty scores")
    rows = [existence_scores(s >= th, t) for th in grid]
    return {
        "threshold": grid,
        "precision": np.array([r["precision"] for r in rows]),
        "recall": np.array([r["recall"] for r in rows]),
        "f1": np.array([r["f1"] for r in rows]),
        "called": np.array([float((s >= th).mean()) for th in grid]),
    }


def plot_existence_pr(
    curves: Mapping[str, Mapping[str, np.ndarray]],
    *,
    operating_points: Mapping[str, float] | None = None,
    prevalence: float | None = None,
    title: str | None = None,
) -> Figure:
    """Existence precision–recall as the threshold moves (left), and F1 against the share of landmarks called
    present (right: the threshold's effect on a scale that every model shares, whatever its score's range).

    Args:
        curves: ``{model name: existence_pr_curve(...)}``.
        operating_points: ``{model name: threshold}`` marked with a dot on both panels, e.g. the decoder's default:
            :data:`h3de_lite.decoding.ANCHOR_THRESHOLD` for the anchor head, ``-inf`` (everything present) for
            heatmaps (:func:`existence_pr_curve_at`).
        prevalence: share of landmarks truly present: the precision of calling everything present, drawn as a
            dotted line on the left.
        title: figure title.

    Returns:
        The figure (two axes); the PR curve of each model carries ``gid="pr:<model>"``.

    Raises:
        ValueError: a curve without the keys of :func:`existence_pr_curve`, or an empty mapping.

    Shape:
        each curve's arrays ``(T,)``.

    Example:
        >>> import matplotlib; matplotlib.use("Agg")
        >>> curve = existence_pr_curve(np.array([[0.9, 0.2]]), np.array([[True, False]]))
        >>> len(plot_existence_pr({"anchor": curve}).axes)
        2
    """
    if not curves:
        raise ValueError("curves is empty; pass {model name: existence_pr_curve(...)}")
    for model, curve in curves.items():
        missing = {"threshold", "precision", "recall", "f1", "called"} - set(curve)
        if missing:
            raise ValueError(f"curve of {model!r} lacks {sorted(missing)}; build it with existence_pr_curve")
    fig, (left, right) = plt.subplots(1, 2, figsize=(8.4, 3.8), constrained_layout=True)
    for m, (model, curve) in enumerate(curves.items()):
        color = _MODEL_COLORS[m % len(_MODEL_COLORS)]
        precision, recall = np.asarray(curve["precision"]), np.asarray(curve["recall"])
        defined = ~np.isnan(precision)
        left.step(recall[defined], precision[defined], where="post", color=color, lw=1.5, label=model,
                  gid=f"pr:{model}")  # fmt: skip
        right.plot(curve["called"], curve["f1"], color=color, lw=1.5, label=model, gid=f"f1:{model}")
        if operating_points and model in operating_points:
            at = existence_pr_curve_at(curve, float(operating_points[model]))
            left.plot(at["recall"], at["precision"], "o", color=color, ms=6, mec="black", gid=f"operating:{model}")
            right.plot(at["called"], at["f1"], "o", color=color, ms=6, mec="black")
    if prevalence is not None:
        left.axhline(float(prevalence), color="0.5", ls=":", lw=1.0, label="all called present")
    left.set_xlabel("recall of 'present'", fontsize=9)
    left.set_ylabel("precision of 'present'", fontsize=9)
    left.set_xlim(-0.02, 1.02)
    left.set_ylim(-0.02, 1.02)
    left.set_title("precision–recall as the threshold moves", fontsize=10)
    right.set_xlabel("share of landmarks called present (threshold falls →)", fontsize=9)
    right.set_ylabel("F1", fontsize=9)
    right.set_xlim(-0.02, 1.02)
    right.set_ylim(-0.02, 1.02)
    right.set_title("F1 as the threshold moves", fontsize=10)
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
    left.legend(fontsize=8, loc="lower left", framealpha=0.85)
    if title is not None:
        fig.suptitle(title)
    return fig


def existence_pr_curve_at(curve: Mapping[str, np.ndarray], threshold: float) -> dict[str, float]:
    """Precision, recall and F1 of ``curve`` when landmarks with ``score ≥ threshold`` are called present.

    With the default sweep of :func:`existence_pr_curve` (every distinct score) this is exact: ``score ≥ threshold``
    calls present the same landmarks as ``score ≥ t``, ``t`` the smallest swept threshold at or above
    ``threshold``, whose row is returned (``"threshold"`` is that ``t``). A threshold above every score calls nothing
    present: precision and F1 ``NaN``, recall 0. ``-inf`` gives the lowest swept threshold (everything present,
    which is the heatmap decoder's default, eq. 2).

    Shape:
        not a tensor function.

    Example:
        >>> curve = {"threshold": np.array([0.1, 0.5]), "precision": np.array([0.5, 1.0]),
        ...          "recall": np.array([1.0, 1.0]), "f1": np.array([0.67, 1.0])}
        >>> existence_pr_curve_at(curve, 0.3)["precision"]
        1.0
    """
    thresholds = np.asarray(curve["threshold"], dtype=np.float64)
    index = int(np.searchsorted(thresholds, threshold, side="left"))
    if index == len(thresholds):
        return {"threshold": float(threshold), "precision": float("nan"), "recall": 0.0, "f1": float("nan"),
                "called": 0.0}
    keys = [key for key in ("threshold", "precision", "recall", "f1", "called") if key in curve]
    return {key: float(np.asarray(curve[key])[index]) for key in keys}


# ---------------------------------------------------------------------------------------------------- plotly 3D
def setup_plotly(renderer: str | None = None) -> str:
    """Choose the plotly renderer for this notebook and return its name.

    Order: ``renderer`` if given; else the ``PLOTLY_RENDERER`` environment variable (plotly reads it too); else
    ``"colab"`` on Google Colab; else ``"plotly_mimetype+notebook"``: JupyterLab, VS Code and classic Jupyter use the
    plotly MIME type, and the HTML part embeds plotly.js once, so the executed notebook and the static book show the
    3D view with no network (a few MB more in the page). ``PLOTLY_RENDERER=notebook_connected`` gives a light page
    that loads plotly.js from its CDN when read online.

    Raises:
        ImportError: plotly is not installed (``pip install plotly``).

    Shape:
        not a tensor function.

    Example:
        >>> setup_plotly("json")  # doctest: +SKIP
        'json'
    """
    try:
        import plotly.io as pio
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("the 3D view needs plotly: pip install plotly (or h3de-lite[book])") from exc
    if renderer is None:
        renderer = os.environ.get("PLOTLY_RENDERER") or (
            "colab" if "google.colab" in sys.modules else "plotly_mimetype+notebook"
        )
    pio.renderers.default = renderer
    return renderer


def _block_mean(volume: np.ndarray, factor: int) -> np.ndarray:
    """Mean over ``factor³`` blocks (edge-padded to a multiple), like a scan at ``factor`` times the voxel size."""
    if factor == 1:
        return volume.astype(np.float32)
    pad = [(0, (-s) % factor) for s in volume.shape]
    padded = np.pad(volume.astype(np.float32), pad, mode="edge")
    d, h, w = (s // factor for s in padded.shape)
    return padded.reshape(d, factor, h, factor, w, factor).mean(axis=(1, 3, 5))


def _has_skimage() -> bool:
    try:
        importlib.import_module("skimage.measure")
    except ImportError:
        return False
    return True


def volume_figure_3d(
    volume: np.ndarray,
    *,
    truth: np.ndarray | None = None,
    prediction: np.ndarray | None = None,
    names: Sequence[str] | None = None,
    spacing: Sequence[float] | None = None,
    levels: Sequence[float] = (300.0, 1500.0),
    level_names: Sequence[str] = ("bone", "teeth"),
    level_colors: Sequence[str] = ("#c9b49a", "#fff6d5"),
    opacities: Sequence[float] = (0.2, 1.0),
    max_size: int | None = None,
    method: str = "auto",
    labels: bool = True,
    lines: bool = True,
    marker_size: float = 6.0,
    title: str | None = None,
    height: int = 560,
) -> go.Figure:
    """Interactive 3D view (plotly): surfaces of bone and teeth, truth as green and predictions as red markers.

    The volume is first averaged over blocks so that its largest side is at most ``max_size`` voxels (a coarser
    scan: the page stays light; about 1 MB of figure data at the defaults). Each iso-level in ``levels`` (default
    300 HU for bone, 1500 HU for enamel and dense dentine) becomes one surface: a triangle mesh from
    :func:`skimage.measure.marching_cubes` when scikit-image is installed (``method="mesh"``), otherwise a plotly
    ``Isosurface`` computed by plotly.js in the browser (``method="isosurface"``); ``"auto"`` picks the first
    available. Coordinates are in mm from the centre of voxel
    ``(0, 0, 0)`` (voxel index × spacing), with the scene's aspect ratio physical. Landmarks: truth as green circles,
    prediction as red diamonds, joined by grey lines (``lines``); hovering shows the name and, for predictions, the
    error in mm. Works headless (the figure is data; nothing is drawn until shown) and in the static book with the
    renderer of :func:`setup_plotly`.

    Args:
        volume: ``(D, H, W)`` intensities (HU by default; pass ``levels`` for other scales).
        truth: ``(L, 3)`` true voxel coordinates, ``NaN`` rows for missing landmarks.
        prediction: ``(L, 3)`` predicted voxel coordinates, ``NaN`` rows for absent ones.
        names: landmark names (numbered when ``None``).
        spacing: ``(3,)`` voxel size in mm (1 mm when ``None``).
        levels: iso-values of the surfaces, one per surface.
        level_names: legend name of each surface.
        level_colors: colour of each surface.
        opacities: opacity of each surface.
        max_size: largest side of the averaged volume, in voxels (default 64 for ``"mesh"``, 40 for
            ``"isosurface"``, which sends every voxel to the browser).
        method: ``"auto"``, ``"mesh"`` (needs scikit-image) or ``"isosurface"``.
        labels: write the landmark names beside the truth markers.
        lines: join each truth to its prediction.
        marker_size: marker size in pixels.
        title: figure title.
        height: figure height in pixels.

    Returns:
        A ``plotly.graph_objects.Figure``: one trace per surface (``Mesh3d`` or ``Isosurface``, named after
        ``level_names``), then ``"ground truth"``, ``"prediction"`` and ``"error"`` (``Scatter3d``) when given.

    Raises:
        ValueError: bad shapes, mismatched level options, ``max_size < 8``, unknown ``method``, or ``"mesh"``
            without scikit-image.
        ImportError: plotly is not installed.

    Shape:
        volume ``(D, H, W)``; truth, prediction ``(L, 3)``; spacing ``(3,)``.

    Example:
        >>> cube = np.zeros((16, 16, 16)); cube[4:12, 4:12, 4:12] = 1.0
        >>> fig = volume_figure_3d(cube, truth=np.array([[1.0, 2.0, 3.0]]), names=["La"],
        ...                        spacing=(0.5, 0.5, 1.0), levels=(0.5,), level_names=("bone",),
        ...                        level_colors=("white",), opacities=(0.3,), method="isosurface")
        >>> [trace.name for trace in fig.data]
        ['bone', 'ground truth']
    """
    try:
        import plotly.graph_objects as go
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("the 3D view needs plotly: pip install plotly (or h3de-lite[book])") from exc
    volume = _volume3(volume)
    s = _spacing3(spacing)
    truth, pred, names = _landmark_arrays(truth, prediction, names)
    levels = [float(v) for v in levels]
    if not (len(levels) == len(level_names) == len(level_colors) == len(opacities)):
        raise ValueError(f"levels, level_names, level_colors and opacities need one entry per surface, got "
                         f"{len(levels)}, {len(level_names)}, {len(level_colors)}, {len(opacities)}")  # fmt: skip
    if method not in ("auto", "mesh", "isosurface"):
        raise ValueError(f"method must be 'auto', 'mesh' or 'isosurface', got {method!r}")
    if method == "auto":
        method = "mesh" if _has_skimage() else "isosurface"
    if method == "mesh" and not _has_skimage():
        raise ValueError("method='mesh' needs scikit-image (pip install scikit-image); use method='isosurface'")
    if max_size is None:
        max_size = 64 if method == "mesh" else 40
    if not isinstance(max_size, int) or max_size < 8:
        raise ValueError(f"max_size must be an integer >= 8 voxels, got {max_size!r}")

    # STEP 1: a coarser volume; block b covers voxels b·f … b·f + f − 1, centred at b·f + (f − 1)/2
    factor = max(1, math.ceil(max(volume.shape) / max_size))
    coarse = _block_mean(volume, factor)  # (D/f, H/f, W/f)
    offset = (factor - 1) / 2.0

    def to_mm(index: np.ndarray) -> np.ndarray:  # coarse voxel index (..., 3) → mm
        return (index * factor + offset) * s

    # STEP 2: one surface per iso-level
    traces: list[Any] = []
    for level, name, color, opacity in zip(levels, level_names, level_colors, opacities, strict=True):
        if not coarse.min() < level < coarse.max():
            continue  # the level crosses no voxel: no surface
        if method == "mesh":
            from skimage.measure import marching_cubes

            verts, faces, _, _ = marching_cubes(coarse, level=level)  # verts (V, 3) in coarse voxel indices
            faces = faces.astype(np.int32)  # (F, 3) vertex indices
            xyz = to_mm(verts).astype(np.float32)
            traces.append(go.Mesh3d(x=xyz[:, 0], y=xyz[:, 1], z=xyz[:, 2], i=faces[:, 0], j=faces[:, 1],
                                    k=faces[:, 2], color=color, opacity=opacity, name=name, showlegend=True,
                                    hoverinfo="name", flatshading=False,
                                    lighting={"ambient": 0.45, "diffuse": 0.8, "specular": 0.2}))  # fmt: skip
        else:
            grid = np.stack(np.meshgrid(*(np.arange(n) for n in coarse.shape), indexing="ij"), axis=-1)
            xyz = to_mm(grid.reshape(-1, 3).astype(np.float64)).astype(np.float32)
            traces.append(go.Isosurface(x=xyz[:, 0], y=xyz[:, 1], z=xyz[:, 2], value=coarse.ravel(), isomin=level,
                                        isomax=level, surface_count=1, caps={"x_show": False, "y_show": False,
                                        "z_show": False}, colorscale=[[0, color], [1, color]], showscale=False,
                                        opacity=opacity, name=name, showlegend=True, hoverinfo="name"))  # fmt: skip

    # STEP 3: landmarks as markers, in mm
    def marker_trace(points: np.ndarray, label: str, color: str, symbol: str, hover: list[str], text: bool) -> Any:
        keep = np.all(np.isfinite(points), axis=1)
        xyz = points[keep] * s
        return go.Scatter3d(
            x=xyz[:, 0], y=xyz[:, 1], z=xyz[:, 2], mode="markers+text" if text else "markers", name=label,
            marker={"size": marker_size, "color": color, "symbol": symbol, "line": {"color": "black", "width": 1}},
            text=[n for n, k in zip(names, keep, strict=True) if k] if text else None, textposition="top center",
            textfont={"color": color, "size": 11}, hoverinfo="text",
            hovertext=[h for h, k in zip(hover, keep, strict=True) if k],
        )  # fmt: skip

    if truth is not None:
        traces.append(marker_trace(truth, "ground truth", TRUTH_COLOR, "circle", [f"{n} (truth)" for n in names],
                                   labels))  # fmt: skip
    if pred is not None:
        hover = []
        for i, n in enumerate(names):
            if truth is not None and _finite(truth[i]) and _finite(pred[i]):
                hover.append(f"{n} (prediction): {float(np.linalg.norm((pred[i] - truth[i]) * s)):.1f} mm from truth")
            else:
                hover.append(f"{n} (prediction)")
        traces.append(marker_trace(pred, "prediction", PREDICTION_COLOR, "diamond", hover,
                                   labels and truth is None))  # fmt: skip
    if lines and truth is not None and pred is not None:
        xs, ys, zs = [], [], []
        for t, p in zip(truth * s, pred * s, strict=True):
            if _finite(t) and _finite(p):
                xs += [t[0], p[0], None]
                ys += [t[1], p[1], None]
                zs += [t[2], p[2], None]
        traces.append(go.Scatter3d(x=xs, y=ys, z=zs, mode="lines", name="error", hoverinfo="skip",
                                   line={"color": "#555555", "width": 3}))  # fmt: skip

    fig = go.Figure(data=traces)
    fig.update_layout(
        title=title,
        height=height,
        margin={"l": 0, "r": 0, "t": 40 if title else 10, "b": 0},
        legend={"orientation": "h", "y": 0.02, "x": 0.02},
        scene={
            "aspectmode": "data",
            "xaxis_title": "axis 0, L → R (mm)",
            "yaxis_title": "axis 1, P → A (mm)",
            "zaxis_title": "axis 2, I → S (mm)",
            "camera": {"eye": {"x": 0.2, "y": 1.9, "z": 0.8}},  # from the front, a little above
        },
    )
    return fig


# ---------------------------------------------------------------------------------------------------- widgets
def _render_plane_png(volume: np.ndarray, *, axis: int, index: int, truth: np.ndarray | None,
                      prediction: np.ndarray | None, names: Sequence[str], spacing: np.ndarray,
                      window: tuple[float, float], tolerance_mm: float, size_in: float) -> bytes:  # fmt: skip
    """One slice with the landmarks near it, rendered to PNG bytes (matplotlib Agg, no pyplot figure kept)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    label = {2: "axial", 1: "coronal", 0: "sagittal"}[axis]
    fixed, horizontal, vertical = _PANELS[label]
    fig = Figure(figsize=(size_in, size_in), constrained_layout=True)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = np.take(volume, index, axis=fixed)
    if horizontal > vertical:
        image = image.T
    _image_panel(ax, image, horizontal=horizontal, vertical=vertical, spacing=spacing, window=window, cmap="gray")
    ax.set_title(f"{label}: axis {fixed} = {index}", fontsize=10)
    n = len(names)
    if n:
        keep = np.stack([_near_plane(truth, fixed, index, spacing, tolerance_mm, n),
                         _near_plane(prediction, fixed, index, spacing, tolerance_mm, n)], axis=1)  # fmt: skip
        _overlay(ax, truth=truth, prediction=prediction, names=names, horizontal=horizontal, vertical=vertical,
                 keep=keep)  # fmt: skip
        handles = _legend_handles(truth is not None, prediction is not None)
        if handles:
            ax.legend(handles=handles, loc="lower left", fontsize=7, framealpha=0.8)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    return buffer.getvalue()


def slice_browser(
    volume: np.ndarray,
    *,
    truth: np.ndarray | None = None,
    prediction: np.ndarray | None = None,
    names: Sequence[str] | None = None,
    spacing: Sequence[float] | None = None,
    window: tuple[float, float] = _WINDOW,
    axis: int = 2,
    index: int | None = None,
    tolerance_mm: float = 3.0,
    size_in: float = 5.0,
) -> Any:
    """An ipywidgets slice browser: a plane selector, a slider over the slices and the slice as a PNG image.

    The always-available viewer: it needs only ipywidgets and matplotlib. Landmarks within ``tolerance_mm`` of the
    shown slice are drawn (truth green circles, prediction red crosses). Moving the slider re-renders the slice in
    Python, so browsing needs a live kernel; a static page (the book) shows the first slice only.

    Args:
        volume: ``(D, H, W)`` intensities.
        truth: ``(L, 3)`` true voxel coordinates (``NaN`` rows missing).
        prediction: ``(L, 3)`` predicted voxel coordinates.
        names: landmark names.
        spacing: ``(3,)`` voxel size in mm.
        window: display range of intensities.
        axis: array axis fixed by the first plane: 2 axial, 1 coronal, 0 sagittal.
        index: first slice (default: the middle one).
        tolerance_mm: how far from the slice a landmark may lie and still be drawn.
        size_in: image size in inches (90 dpi).

    Returns:
        ``ipywidgets.VBox([HBox([plane Dropdown, slice IntSlider]), Image])``.

    Raises:
        ValueError: bad volume, landmarks, spacing, window, axis or index.
        ImportError: ipywidgets is not installed.

    Shape:
        volume ``(D, H, W)``; truth, prediction ``(L, 3)``; spacing ``(3,)``.

    Example:
        >>> browser = slice_browser(np.zeros((16, 16, 8)))  # doctest: +SKIP
        >>> browser.children[0].children[1].max  # doctest: +SKIP
        7
    """
    try:
        import ipywidgets as widgets
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("the slice browser needs ipywidgets: pip install ipywidgets") from exc
    volume = _volume3(volume)
    s = _spacing3(spacing)
    window = _window(window)
    truth, pred, names = _landmark_arrays(truth, prediction, names)
    if axis not in (0, 1, 2):
        raise ValueError(f"axis must be 0 (sagittal), 1 (coronal) or 2 (axial), got {axis!r}")
    if index is None:
        index = volume.shape[axis] // 2
    if not 0 <= int(index) < volume.shape[axis]:
        raise ValueError(f"index {index} is outside axis {axis} of size {volume.shape[axis]}")

    def render(a: int, i: int) -> bytes:
        return _render_plane_png(volume, axis=a, index=i, truth=truth, prediction=pred, names=names, spacing=s,
                                 window=window, tolerance_mm=tolerance_mm, size_in=size_in)  # fmt: skip

    plane = widgets.Dropdown(options=[("axial (axis 2)", 2), ("coronal (axis 1)", 1), ("sagittal (axis 0)", 0)],
                             value=axis, description="plane", layout=widgets.Layout(width="220px"))  # fmt: skip
    slider = widgets.IntSlider(value=int(index), min=0, max=volume.shape[axis] - 1, description="slice",
                               continuous_update=False, layout=widgets.Layout(width="360px"))  # fmt: skip
    image = widgets.Image(value=render(axis, int(index)), format="png")

    def on_plane(change: dict) -> None:
        a = int(change["new"])
        with slider.hold_trait_notifications():
            slider.max = volume.shape[a] - 1
            slider.value = volume.shape[a] // 2
        image.value = render(a, int(slider.value))

    def on_slice(change: dict) -> None:
        image.value = render(int(plane.value), int(change["new"]))

    plane.observe(on_plane, names="value")
    slider.observe(on_slice, names="value")
    return widgets.VBox([widgets.HBox([plane, slider]), image])


def view_itk(
    volume: np.ndarray,
    *,
    truth: np.ndarray | None = None,
    prediction: np.ndarray | None = None,
    spacing: Sequence[float] | None = None,
    **kwargs: Any,
) -> Any:
    """Open the volume and landmarks in itkwidgets (optional backend; never run in CI or the book build).

    itkwidgets renders volumes on the GPU in the browser. Its two lines differ: 0.32 (``view(image, point_sets=[...],
    point_set_colors=[...])``) pins ipywidgets < 8, which clashes with this package's ipywidgets 8; 1.0 (alpha
    releases, ``view(image=..., point_set=...)``) works in JupyterLab, Jupyter Notebook and, per its documentation,
    Google Colab (``pip install 'itkwidgets[notebook]>=1.0a49'``), but its viewer waits for a browser, so executing
    a notebook headless (nbval, the book build) hangs. Notebook 08 therefore runs this only when the reader sets
    ``H3DE_ITKWIDGETS=1``. The array is passed as itk's ``(W, H, D)`` order (itk's x is array axis 0), and with the
    ``itk`` package installed as an image with ``spacing``, the points in mm; otherwise in voxel units.

    Args:
        volume: ``(D, H, W)`` intensities.
        truth: ``(L, 3)`` true voxel coordinates (green).
        prediction: ``(L, 3)`` predicted voxel coordinates (red).
        spacing: ``(3,)`` voxel size in mm.
        kwargs: passed on to ``itkwidgets.view``.

    Returns:
        Whatever ``itkwidgets.view`` returns (a viewer widget).

    Raises:
        ImportError: itkwidgets is not installed (the message says what to install).
        ValueError: bad shapes.

    Shape:
        volume ``(D, H, W)``; truth, prediction ``(L, 3)``.

    Example:
        >>> viewer = view_itk(case.volume, truth=case.landmarks, spacing=case.spacing)  # doctest: +SKIP
    """
    try:
        itkwidgets = importlib.import_module("itkwidgets")
    except ImportError as exc:
        raise ImportError(
            "itkwidgets is not installed; in Jupyter or on Colab: pip install 'itkwidgets[notebook]>=1.0a49' "
            "(itkwidgets 0.32 needs ipywidgets < 8); the Plotly view and slice_browser need no extra package"
        ) from exc
    volume = _volume3(volume)
    s = _spacing3(spacing)
    truth, pred, _ = _landmark_arrays(truth, prediction, None)
    image: Any = np.ascontiguousarray(volume.transpose(2, 1, 0))  # itk reads arrays as (z, y, x)
    scale = np.ones(3)
    try:
        itk = importlib.import_module("itk")
        image = itk.image_from_array(image.astype(np.float32))
        image.SetSpacing([float(v) for v in s])
        scale = s
    except ImportError:
        pass
    point_sets, colors = [], []
    for points, color in ((truth, (0.17, 0.63, 0.17)), (pred, (0.84, 0.15, 0.16))):
        if points is not None:
            point_sets.append(points[np.all(np.isfinite(points), axis=1)] * scale)
            colors.append(color)
    version = str(getattr(itkwidgets, "__version__", "1"))
    if version.startswith("0."):
        return itkwidgets.view(image, point_sets=point_sets, point_set_colors=colors, **kwargs)
    points = np.concatenate(point_sets) if point_sets else None
    return itkwidgets.view(image=image, point_set=points, **kwargs)
