"""One CT case: a volume, its voxel spacing and its landmarks, the unit every reader, writer and generator shares."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from h3de_lite.data.landmarks import LANDMARK_NAMES


@dataclass
class Case:
    """A CT volume with landmarks in voxel coordinates.

    Args:
        volume: ``(D, H, W)`` intensities (Hounsfield units for raw CT, [0, 255] after normalisation).
        landmarks: ``(L, 3)`` float voxel coordinates in array-axis order; ``NaN`` rows for missing landmarks.
        spacing: ``(3,)`` voxel size in mm, in the same axis order.
        case_id: identifier, e.g. ``"0007"``.
        affine: ``(4, 4)`` voxel → world (RAS, mm) matrix; defaults to ``diag(spacing, 1)``.
        names: landmark names, one per row of ``landmarks``.

    Shape:
        volume ``(D, H, W)``; landmarks ``(L, 3)``; present ``(L,)`` bool.
    """

    volume: np.ndarray
    landmarks: np.ndarray
    spacing: np.ndarray
    case_id: str = ""
    affine: np.ndarray | None = None
    names: tuple[str, ...] = field(default=LANDMARK_NAMES)

    def __post_init__(self) -> None:
        self.volume = np.asarray(self.volume)
        self.landmarks = np.asarray(self.landmarks, dtype=np.float64)
        self.spacing = np.asarray(self.spacing, dtype=np.float64)
        if self.volume.ndim != 3:
            raise ValueError(f"case {self.case_id!r}: volume must be 3D (D, H, W), got shape {self.volume.shape}")
        if self.landmarks.ndim != 2 or self.landmarks.shape[1] != 3:
            raise ValueError(f"case {self.case_id!r}: landmarks must be (L, 3), got shape {self.landmarks.shape}")
        if len(self.names) != len(self.landmarks):
            raise ValueError(
                f"case {self.case_id!r}: {len(self.landmarks)} landmark rows but {len(self.names)} names"
            )
        validate_spacing(self.spacing, what=f"case {self.case_id!r} spacing")
        if self.affine is None:
            self.affine = np.diag([*self.spacing, 1.0])
        self.affine = np.asarray(self.affine, dtype=np.float64)
        present = self.present
        shape = np.asarray(self.volume.shape, dtype=np.float64)
        inside = np.all((self.landmarks[present] >= -0.5) & (self.landmarks[present] <= shape - 0.5), axis=1)
        if not inside.all():
            bad = [self.names[i] for i, ok in zip(np.flatnonzero(present), inside) if not ok]
            raise ValueError(
                f"case {self.case_id!r}: landmarks {bad} lie outside the volume of shape {self.volume.shape}; "
                "check the coordinate order (array axes) and units (voxels, not mm)"
            )

    @property
    def present(self) -> np.ndarray:
        """``(L,)`` bool: True where the landmark exists (its row is not NaN)."""
        return ~np.isnan(self.landmarks).any(axis=1)

    @property
    def is_complete(self) -> bool:
        """True when every landmark is present."""
        return bool(self.present.all())


def validate_spacing(spacing: np.ndarray, *, what: str = "spacing", per_case: bool = False) -> np.ndarray:
    """Return ``spacing`` as a float array of shape ``(3,)`` (or ``(B, 3)`` with ``per_case=True``).

    Raises ``ValueError`` for NaN, non-positive values or a wrong shape, naming ``what``.
    """
    spacing = np.asarray(spacing, dtype=np.float64)
    if spacing.shape[-1:] != (3,) or spacing.ndim > (2 if per_case else 1):
        expected = "(3,) or (B, 3)" if per_case else "(3,)"
        raise ValueError(f"{what} must have shape {expected} in mm, got shape {spacing.shape}")
    if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise ValueError(f"{what} must be three finite positive numbers in mm, got {spacing.tolist()}")
    return spacing
