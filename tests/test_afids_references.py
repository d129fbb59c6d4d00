"""Single-atlas evaluation: the identity and known-transform references on rigid copies, ``h3de-lite evaluate`` on
the same folder (AFIDs-style names, percentile normalisation, SDR at 2/4/8 mm). Synthetic template, no network."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_afids_atlas import NAMES, _dots_case

from h3de_lite.cli import main
from h3de_lite.data.atlas import read_rigid_transforms, write_rigid_copies
from h3de_lite.data.case import Case
from h3de_lite.data.nifti import voxel_to_world
from h3de_lite.evaluation import Predictor, load_predictor
from h3de_lite.references import (
    comparison_table,
    identity_reference,
    known_transform_reference,
    per_landmark_table,
)
from h3de_lite.training import TrainConfig, build_model_from_config


@pytest.fixture(scope="module")
def copies(tmp_path_factory: pytest.TempPathFactory) -> tuple[Case, Path]:
    case = _dots_case(shape=(40, 44, 36), spacing=(2.0, 2.0, 2.0), sigma_mm=3.0)
    template = Case(volume=np.rint(case.volume + 100).astype(np.int16), landmarks=case.landmarks,
                    spacing=case.spacing, affine=case.affine, names=case.names)  # fmt: skip
    folder = tmp_path_factory.mktemp("copies")
    write_rigid_copies(template, folder, n=3, seed=0, max_rotation_deg=20, max_shift_mm=10)
    return template, folder


def test_identity_reference_is_the_motion(copies: tuple[Case, Path]) -> None:
    template, folder = copies
    result = identity_reference(folder, template)
    world = voxel_to_world(template.landmarks, template.affine)
    transforms = read_rigid_transforms(folder)
    for case in result.cases:
        m = transforms[case.case_id]
        expected = np.linalg.norm(world @ m[:3, :3].T + m[:3, 3] - world, axis=1)
        np.testing.assert_allclose(case.errors, expected, atol=1e-6)
    assert result.thresholds == (2.0, 4.0, 8.0) and result.summary["all"]["n_cases"] == 3
    assert result.summary["all"]["mre"] > 1.0


def test_known_transform_reference_is_the_grid_floor(copies: tuple[Case, Path]) -> None:
    template, folder = copies
    exact = known_transform_reference(folder, template, spacing=None)
    assert exact.summary["all"]["mre"] < 0.01  # a Gaussian decodes exactly (sub-voxel fit of its log)
    coarse = known_transform_reference(folder, template, spacing=4.0)
    assert coarse.summary["all"]["mre"] < 0.05
    argmax = known_transform_reference(folder, template, spacing=4.0, method="argmax")
    errors = np.concatenate([c.errors for c in argmax.cases])
    assert 0.3 < errors.mean() and errors.max() <= 0.5 * np.sqrt(3) * 4.0 + 1e-6  # at most half a 4 mm voxel
    table = comparison_table([identity_reference(folder, template), coarse, argmax])
    assert table.splitlines()[0].startswith("| Method | Cases | MRE ± SD (mm) | SDR 2 mm (%) | SDR 4 mm (%) | SDR 8 mm")
    assert "known transform (4 mm, argmax)" in table
    rows = per_landmark_table({"identity": identity_reference(folder, template), "argmax": argmax}).splitlines()
    assert len(rows) == 2 + len(NAMES) and rows[2].startswith("| AC |")


def _run(folder: Path, *, names: list[str], percentiles: list[float] | None, spacing: float = 4.0) -> Path:
    """A run folder with an untrained (seeded) tiny U-Net of len(names) channels, as fit + the afids recipe write it."""
    torch.manual_seed(0)
    spec = {"kind": "baseline", "name": "unet3d", "num_landmarks": len(names)}
    folder.mkdir(parents=True)
    config = {"train": TrainConfig(heatmap_loss="softmax_ce", val_roi_size=(32, 32, 32)).to_dict(), "model": spec,
              "data": {"spacing": spacing, "window": None, "percentiles": percentiles, "crop": [32, 32, 32],
                       "names": names}, "world_size": 1}  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    torch.save({"model": build_model_from_config(spec).state_dict()}, folder / "best.pt")
    return folder


def test_cli_evaluate_scores_the_copies_with_names_and_sdr(copies: tuple[Case, Path], tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    template, folder = copies
    run = _run(tmp_path / "run", names=list(NAMES), percentiles=[0.5, 99.5])
    predictor = load_predictor(run, device="cpu")
    assert predictor.names == NAMES and predictor.percentiles == (0.5, 99.5)
    argv = ["evaluate", "--run", str(run), "--data", str(folder), "--split", ".", "--sdr", "2", "4", "8"]
    assert main([*argv, "--no-progress", "--overlap", "0.25"]) == 0
    summary = json.loads((run / "eval.json").read_text())
    assert summary["all"]["n_cases"] == 3
    assert list(summary["all"]["sdr"]) == ["2.0", "4.0", "8.0"]
    assert list(summary["all"]["per_landmark"]) == list(NAMES)
    assert "| SDR 8 mm (%) |" in capsys.readouterr().out
    table = comparison_table({"cli": summary, "identity": identity_reference(folder, template)})
    assert table.splitlines()[2].startswith("| cli | 3 | ") and "| identity | 3 | " in table
    assert per_landmark_table({"cli": summary}).splitlines()[2].startswith("| AC | ")


def test_run_names_must_match_the_channels(tmp_path: Path) -> None:
    run = _run(tmp_path / "run", names=["a", "b"], percentiles=None)
    config = json.loads((run / "config.json").read_text())
    config["data"]["names"] = ["a", "b", "c"]  # three names for a two-channel model
    (run / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="one unique name per output channel"):
        load_predictor(run, device="cpu")


def test_percentile_predictor_ignores_the_intensity_scale() -> None:
    torch.manual_seed(0)
    model = build_model_from_config({"kind": "baseline", "name": "unet3d", "num_landmarks": 2}).eval()
    predictor = Predictor(model=model, names=("a", "b"), window=None, percentiles=(0.5, 99.5), roi_size=(32, 32, 32))
    volume = np.random.default_rng(0).gamma(2.0, 300.0, size=(32, 32, 32)).astype(np.float32)
    a = predictor.predict(volume, spacing=(1.0, 1.0, 1.0))[0]
    b = predictor.predict(volume * 11.0 + 40.0, spacing=(1.0, 1.0, 1.0))[0]
    np.testing.assert_allclose(a, b, atol=1e-3)
    with pytest.raises(ValueError, match="percentiles"):
        Predictor(model=model, names=("a", "b"), percentiles=(99.0, 1.0))


def test_predict_any_orientation_size_and_spacing_writes_named_markups(copies: tuple[Case, Path],
                                                                       tmp_path: Path) -> None:  # fmt: skip
    """A RAS-trained model on the same scan stored LPS with permuted axes gives the same world points (the reorientation
    is exact); a resampled copy of another size and spacing runs too; the markups carry the names."""
    from h3de_lite.data.markups import read_markups
    from h3de_lite.data.nifti import read_nifti, reorient_to_ras, write_nifti
    from h3de_lite.data.transforms import resample
    from h3de_lite.evaluation import predict_files

    template, folder = copies
    volume, affine = read_nifti(folder / "rigid_00.nii.gz")
    # stored as (W, D, H) with the first two axes flipped: an LPS-like, permuted layout
    permuted = np.flip(np.transpose(volume, (2, 0, 1)), axis=(1, 2)).copy()
    to_old = np.zeros((4, 4))  # permuted voxel (i, j, k) -> original voxel (n0 - 1 - j, n1 - 1 - k, i)
    to_old[0, 1], to_old[1, 2], to_old[2, 0], to_old[3, 3] = -1.0, -1.0, 1.0, 1.0
    to_old[:3, 3] = [volume.shape[0] - 1, volume.shape[1] - 1, 0]
    write_nifti(tmp_path / "permuted.nii.gz", permuted, affine @ to_old)
    back, back_affine = reorient_to_ras(permuted, affine @ to_old)
    np.testing.assert_array_equal(back, volume)
    np.testing.assert_allclose(back_affine, affine, atol=1e-5)
    small = resample(Case(volume=volume.astype(np.float32), landmarks=np.zeros((0, 3)), spacing=(2.0, 2.0, 2.0),
                          affine=affine, names=()), spacing=(2.5, 3.0, 1.5))  # fmt: skip
    write_nifti(tmp_path / "resampled.nii.gz", small.volume, small.affine)

    run = _run(tmp_path / "run", names=list(NAMES), percentiles=[0.5, 99.5])
    config = json.loads((run / "config.json").read_text())
    config["data"]["orientation"] = "RAS"
    (run / "config.json").write_text(json.dumps(config))
    predictor = load_predictor(run, device="cpu")
    assert predictor.orientation == "RAS"
    images = [folder / "rigid_00.nii.gz", tmp_path / "permuted.nii.gz", tmp_path / "resampled.nii.gz"]
    results = predict_files(predictor, images, tmp_path / "pred")
    np.testing.assert_allclose(results[1].world, results[0].world, atol=1e-3)
    assert np.isfinite(results[2].world).all()
    for r in results:
        points = read_markups(r.markups)
        assert tuple(points) == NAMES
        np.testing.assert_allclose(np.stack(list(points.values())), r.world, atol=1e-6)
    with pytest.raises(ValueError, match="affine"):
        predictor.predict(volume, spacing=(2.0, 2.0, 2.0))
