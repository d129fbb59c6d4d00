"""Phantom v1 stays byte-identical: SHA-256 of the volume, landmark and spacing bytes pinned from the v1 generator.

The hashes were computed with the generator as it was before phantom v2 existed (commit 4db17fe, where
``generate_phantom`` had no ``difficulty`` argument), so any change to v1's random draws, geometry or rendering fails
here. v2 may change freely; ``difficulty="v1"`` must not.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from h3de_lite.data.phantom import generate_phantom


def _digest(case) -> str:
    sha = hashlib.sha256()
    for array in (case.volume, case.landmarks, case.spacing):
        sha.update(np.ascontiguousarray(array).tobytes())
    return sha.hexdigest()


@pytest.mark.parametrize(
    "seed, incomplete, expected",
    [
        (0, False, "435dfab08b45441c72ed6dbcc76892d1441fd5ccc558e3f6c6c742e7e63470ab"),
        (1, True, "75d2d1e7b521cf02954743e73eecb0a72da6d00a72083397948387711fb87ba9"),
        (2, False, "dd17cc6c0c9fd2665186840d7b77763797e578c4a6d13761e5abf812d6956bc5"),
        (7, True, "a8986b14227eb5114fa3db5b6638a0094049295af8950a2d15314c040e0f1157"),
    ],
)
def test_v1_small_cases_are_byte_identical(seed: int, incomplete: bool, expected: str) -> None:
    case = generate_phantom(seed=seed, shape=(64, 64, 48), incomplete=incomplete, difficulty="v1")
    assert _digest(case) == expected


def test_v1_default_shape_is_byte_identical() -> None:
    case = generate_phantom(seed=5, incomplete=True, difficulty="v1")
    assert case.volume.shape == (192, 192, 128)
    assert _digest(case) == "1b12ff6292d5768fe65ba4a3a9f84e690071e1261e2beadf33647e3d2caa9e29"
