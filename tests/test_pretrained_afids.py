"""The shipped ``afids`` model through ``h3de-lite predict --pretrained afids``: any size, spacing and orientation of a
T1w-like head in, Slicer markups of the 32 named AFIDs out, in world mm. The head is the synthetic stand-in
(:func:`~h3de_lite.data.afids.synthetic_afids_template`, no network): this checks the path from file to markups, not
accuracy (notebook 09 and the model card measure that on the real template)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from h3de_lite import pretrained
from h3de_lite.cli import main
from h3de_lite.data.afids import AFIDS_NAMES, synthetic_afids_template
from h3de_lite.data.case import Case
from h3de_lite.data.markups import read_markups
from h3de_lite.data.nifti import reorient_to_ras, write_nifti
from h3de_lite.data.transforms import resample


@pytest.fixture(scope="module")
def scans(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("afids-scans")
    case = synthetic_afids_template(spacing=3.0).case
    volume, affine = case.volume.astype(np.float32), case.affine
    write_nifti(folder / "ras.nii.gz", volume, affine)
    # the same voxels stored (W, D, H) with the first two stored axes flipped: an LPS-like, permuted layout
    permuted = np.flip(np.transpose(volume, (2, 0, 1)), axis=(0, 1)).copy()
    to_old = np.zeros((4, 4))  # permuted voxel (i, j, k) -> original voxel (n0 - 1 - j, k, n2 - 1 - i)
    to_old[0, 1], to_old[1, 2], to_old[2, 0], to_old[3, 3] = -1.0, 1.0, -1.0, 1.0
    to_old[:3, 3] = [volume.shape[0] - 1, 0, volume.shape[2] - 1]
    back, back_affine = reorient_to_ras(permuted, affine @ to_old)
    np.testing.assert_array_equal(back, volume)
    np.testing.assert_allclose(back_affine, affine, atol=1e-5)
    write_nifti(folder / "permuted.nii.gz", permuted, affine @ to_old)
    other = resample(Case(volume=volume, landmarks=np.zeros((0, 3)), spacing=(3.0, 3.0, 3.0), affine=affine,
                          names=()), spacing=(2.4, 3.5, 2.0))  # fmt: skip
    write_nifti(folder / "resampled.nii.gz", other.volume, other.affine)
    return {name: folder / f"{name}.nii.gz" for name in ("ras", "permuted", "resampled")}


def test_afids_is_packaged_with_its_card_and_licence() -> None:
    assert "afids" in pretrained.available()
    folder = pretrained.weights_path("afids")
    card = json.loads((folder / "card.json").read_text())
    assert "CC-BY" in card["licence"] and "AFIDs" in card["attribution"]
    assert "CC-BY" in (folder / "MODEL_CARD.md").read_text()
    assert json.loads((folder / "config.json").read_text())["data"]["names"] == list(AFIDS_NAMES)
    assert sum(p.stat().st_size for p in folder.iterdir()) < 10 * 2**20


def test_predict_pretrained_afids_any_orientation_size_and_spacing(scans: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "pred"
    assert main(["predict", "--pretrained", "afids", *map(str, scans.values()), "--out", str(out),
                 "--no-progress"]) == 0  # fmt: skip
    world = {}
    for name in scans:
        document = json.loads((out / f"{name}.mrk.json").read_text())
        assert "markups-schema" in document["@schema"] and document["markups"][0]["type"] == "Fiducial"
        assert [p["label"] for p in document["markups"][0]["controlPoints"]] == list(AFIDS_NAMES)
        points = read_markups(out / f"{name}.mrk.json")
        assert tuple(points) == AFIDS_NAMES
        world[name] = np.stack(list(points.values()))
    # reorienting is exact (a permutation and flips of the same voxels): the same world points
    present = np.isfinite(world["ras"]).all(axis=1)
    np.testing.assert_array_equal(np.isfinite(world["permuted"]).all(axis=1), present)
    np.testing.assert_allclose(world["permuted"][present], world["ras"][present], atol=1e-3)
    assert present.any() and np.isfinite(world["resampled"]).any()
