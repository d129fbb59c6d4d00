"""Data: the Case container, landmark names, readers/writers, the phantom generator, transforms and datasets."""

from h3de_lite.data.case import Case, validate_spacing
from h3de_lite.data.landmarks import LANDMARK_NAMES, NUM_LANDMARKS, describe

__all__ = ["Case", "validate_spacing", "LANDMARK_NAMES", "NUM_LANDMARKS", "describe"]
