"""Slice panels for CT volumes with landmarks: three orthogonal planes through a point, landmarks overlaid.

Explained in notebooks/02_data.ipynb.
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

__all__ = ["plot_orthogonal_slices"]

# (fixed axis, horizontal axis, vertical axis, title) for each panel
_PANELS: tuple[tuple[int, int, int, str], ...] = (
    (2, 0, 1, "axial"),
    (1, 0, 2, "coronal"),
    (0, 1, 2, "sagittal"),
)
_AXIS_LABELS = ("axis 0 (L → R)", "axis 1 (P → A)", "axis 2 (I → S)")


def plot_orthogonal_slices(
    volume: np.ndarray,
    *,
    center: Sequence[float],
    landmarks: np.ndarray | None = None,
    names: Sequence[str] | None = None,
    spacing: Sequence[float] | None = None,
    window: tuple[float, float] = (-200.0, 2500.0),
    axes: Sequence[Axes] | None = None,
    title: str | None = None,
    tolerance_mm: float = 3.0,
    cmap: str = "gray",
) -> Figure:
    """Axial, coronal and sagittal slices through ``center`` with the landmarks near each slice marked and named.

    Each panel shows the plane through ``round(center)`` perpendicular to one array axis: axial (axis 2 fixed; axis 0
    across, axis 1 up), coronal (axis 1 fixed; axis 0 across, axis 2 up) and sagittal (axis 0 fixed; axis 1 across,
    axis 2 up), so "up" is anterior in the axial panel and superior in the others. Pixels keep their physical aspect
    ratio from ``spacing``. A landmark is drawn on a panel when it lies within ``tolerance_mm`` of that plane
    (projected onto it); ``NaN`` rows (missing landmarks) are skipped. No paper equation: a tool for looking at data.

    Args:
        volume: ``(D, H, W)`` intensities (HU or normalised).
        center: ``(3,)`` voxel coordinates of the point the three planes go through (e.g. a landmark).
        landmarks: ``(L, 3)`` voxel coordinates, ``NaN`` rows for missing landmarks.
        names: one label per landmark row (e.g. ``LANDMARK_NAMES``); rows are numbered when ``None``.
        spacing: ``(3,)`` voxel size in mm; isotropic 1 mm when ``None``.
        window: display range ``(low, high)`` of intensities (default: soft tissue to enamel in HU).
        axes: three matplotlib axes to draw into; a new ``1 × 3`` figure when ``None``.
        title: figure title.
        tolerance_mm: how far from a plane a landmark may lie and still be drawn on it.
        cmap: matplotlib colour map of the image.

    Returns:
        The figure holding the three axes.

    Raises:
        ValueError: ``volume`` not 3D, a ``center``/``spacing``/``landmarks``/``names``/``window``/``axes`` of the
            wrong size, or a ``center`` outside the volume.

    Shape:
        - volume ``(D, H, W)``; center ``(3,)``; landmarks ``(L, 3)``; spacing ``(3,)``.

    Example:
        >>> import matplotlib; matplotlib.use("Agg")
        >>> fig = plot_orthogonal_slices(np.zeros((32, 32, 16)), center=(16, 16, 8), spacing=(0.5, 0.5, 1.0))
        >>> len(fig.axes)
        3

    Explained in notebooks/02_data.ipynb.
    """
    volume = np.asarray(volume)
    if volume.ndim != 3:
        raise ValueError(f"volume must be 3D (D, H, W), got shape {volume.shape}")
    centre = np.asarray(center, dtype=np.float64).reshape(-1)
    if centre.shape != (3,) or not np.all(np.isfinite(centre)):
        raise ValueError(f"center must be three finite voxel coordinates, got {center!r}")
    shape = np.asarray(volume.shape)
    if np.any(centre < -0.5) or np.any(centre > shape - 0.5):
        raise ValueError(f"center {centre.tolist()} lies outside the volume of shape {tuple(volume.shape)}")
    index = np.clip(np.rint(centre).astype(int), 0, shape - 1)
    spacing_arr = np.ones(3) if spacing is None else np.asarray(spacing, dtype=np.float64).reshape(-1)
    if spacing_arr.shape != (3,) or not np.all(np.isfinite(spacing_arr)) or np.any(spacing_arr <= 0):
        raise ValueError(f"spacing must be three positive numbers in mm, got {spacing!r}")
    if len(window) != 2 or not window[0] < window[1]:
        raise ValueError(f"window must be (low, high) with low < high, got {window!r}")
    points = None
    if landmarks is not None:
        points = np.asarray(landmarks, dtype=np.float64)
        if points.ndim != 2 or points.shape[1] != 3:
            raise ValueError(f"landmarks must have shape (L, 3), got {points.shape}")
        if names is None:
            names = [str(i) for i in range(len(points))]
        if len(names) != len(points):
            raise ValueError(f"names has {len(names)} entries but landmarks has {len(points)} rows")

    if axes is None:
        fig, created = plt.subplots(1, 3, figsize=(12.0, 4.4), constrained_layout=True)
        axes = list(created)
    else:
        axes = list(axes)
        if len(axes) != 3:
            raise ValueError(f"axes must hold three matplotlib axes, got {len(axes)}")
        fig = axes[0].figure

    for ax, (fixed, horizontal, vertical, label) in zip(axes, _PANELS):
        image = np.take(volume, index[fixed], axis=fixed)  # remaining axes in increasing order
        if horizontal > vertical:
            image = image.T
        ax.imshow(
            image.T,  # rows = vertical axis
            cmap=cmap,
            vmin=window[0],
            vmax=window[1],
            origin="lower",
            aspect=spacing_arr[vertical] / spacing_arr[horizontal],
            interpolation="nearest",
        )
        ax.set_title(f"{label}: axis {fixed} = {index[fixed]}", fontsize=10)
        ax.set_xlabel(_AXIS_LABELS[horizontal], fontsize=8)
        ax.set_ylabel(_AXIS_LABELS[vertical], fontsize=8)
        ax.tick_params(labelsize=7)
        if points is None:
            continue
        for name, point in zip(names, points):
            if not np.all(np.isfinite(point)):
                continue
            if abs(point[fixed] - index[fixed]) * spacing_arr[fixed] > tolerance_mm:
                continue
            ax.plot(point[horizontal], point[vertical], marker="+", color="tab:red", markersize=9, mew=1.6)
            ax.annotate(
                str(name),
                (point[horizontal], point[vertical]),
                xytext=(4, 4),
                textcoords="offset points",
                color="yellow",
                fontsize=8,
                fontweight="bold",
            )
    if title is not None:
        fig.suptitle(title)
    return fig
