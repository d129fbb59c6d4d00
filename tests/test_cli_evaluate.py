"""``h3de-lite evaluate`` and ``h3de-lite predict``: files and keys written, agreement with the library and with
training's own validation, and user errors that exit 2 with one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_evaluation import make_run, rotated_affine, write_image

from h3de_lite.cli import main
from h3de_lite.data import LANDMARK_NAMES, read_markups, write_markups
from h3de_lite.evaluation import evaluate, load_predictor

L = len(LANDMARK_NAMES)
DATA_4MM = {"spacing": 4.0, "window": [-1000.0, 3000.0], "crop": [32, 32, 32]}


def _one_error_line(err: str, command: str, *fragments: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"h3de-lite {command}: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A phantom dataset and a 1-epoch run of `h3de-lite train` at 4 mm (the tiny MONAI U-Net: fast on CPU)."""
    root = tmp_path_factory.mktemp("cli-eval")
    data, run = root / "data", root / "run"
    argv = ["phantom", "--out", str(data), "--n-train", "2", "--n-val", "1", "--n-test", "2", "--seed", "5"]
    assert main([*argv, "--shape", "64", "64", "48", "--incomplete-fraction", "0.5", "--no-progress"]) == 0
    argv = ["train", "--data", str(data), "--out", str(run), "--model", "unet3d", "--spacing", "4", "--crop", "32",
            "32", "32", "--epochs", "1", "--batch-size", "2", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    return data, run


@pytest.mark.slow
def test_train_evaluate_predict_end_to_end(trained: tuple[Path, Path], tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    data, run = trained
    config = json.loads((run / "config.json").read_text())
    data_config = {key: config["data"][key] for key in ("spacing", "window", "crop")}  # preprocessing kept
    assert data_config == {"spacing": 4.0, "window": [-1000.0, 3000.0], "crop": [32, 32, 32]}
    capsys.readouterr()

    # the validation split scored by evaluate gives training's own validation MRE: same preprocessing, and errors in
    # mm do not depend on the grid they are measured on
    argv = ["evaluate", "--run", str(run), "--data", str(data), "--split", "val", "--overlap", "0.25",
            "--tta", "none"]  # validation's settings: it does not mirror-average (the run's inference default)
    assert main([*argv, "--no-progress"]) == 0
    history = json.loads((run / "history.json").read_text())
    val = json.loads((run / "eval_val.json").read_text())
    assert val["all"]["mre"] == pytest.approx(history["best_val_mre"], rel=1e-4)

    assert main(["evaluate", "--run", str(run), "--data", str(data), "--no-progress", "--paper"]) == 0
    out = capsys.readouterr().out
    assert "| Model | Subset | Cases | MRE ± SD (mm) | SDR 2 mm (%) | SDR 2.5 mm (%) |" in out
    assert "Paper's Table I: not available" in out and f"wrote {run / 'eval_test.json'}" in out
    summary = json.loads((run / "eval_test.json").read_text())
    assert set(summary) == {"complete", "incomplete", "all"}
    assert [summary[s]["n_cases"] for s in ("complete", "incomplete", "all")] == [1, 1, 2]
    assert {p.name for p in run.iterdir()} >= {"eval_test.json", "eval_test.csv", "eval_test.md", "eval_val.json"}
    assert len((run / "eval_test.csv").read_text().splitlines()) == 3  # header + 2 cases

    volumes = sorted((data / "test").glob("*_volume.nrrd"))
    argv = ["predict", "--run", str(run), *map(str, volumes), "--out", str(tmp_path / "pred"), "--no-progress"]
    assert main(argv) == 0
    assert sorted(p.name for p in (tmp_path / "pred").iterdir()) == ["0003.csv", "0003.mrk.json", "0004.csv",
                                                                      "0004.mrk.json"]  # fmt: skip
    library = evaluate(load_predictor(run, device="cpu"), data, split="test")
    for case in library.cases:
        for suffix in (".mrk.json", ".csv"):
            points = read_markups(tmp_path / "pred" / f"{case.case_id}{suffix}")
            back = np.stack([points[n] for n in LANDMARK_NAMES])
            np.testing.assert_allclose(back, case.world, rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two CT-like images (NIfTI, NRRD) with Slicer landmark files, in one flat folder."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(1)
    affine = rotated_affine(np.array([1.5, 1.5, 2.0]), np.array([5.0, -3.0, 12.0]))
    for name, suffix, labels in (("p1", ".nii.gz", ".mrk.json"), ("p2", ".nrrd", ".csv")):
        volume = rng.integers(-1000, 2500, size=(30, 28, 20)).astype(np.int16)
        write_image(folder / f"{name}{suffix}", volume, affine)
        voxels = rng.uniform(2, 18, size=(L, 3))
        world = voxels @ affine[:3, :3].T + affine[:3, 3]
        write_markups(folder / f"{name}{labels}", dict(zip(LANDMARK_NAMES[:-1], world[:-1])))  # Rf missing
    return folder


def test_evaluate_and_predict_on_an_image_folder(image_folder: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    run = make_run(tmp_path / "run", data=DATA_4MM)
    out = tmp_path / "results"
    argv = ["evaluate", "--run", str(run), "--data", str(image_folder), "--split", ".", "--out", str(out)]
    assert main([*argv, "--device", "cpu", "--no-progress"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["eval.csv", "eval.json", "eval.md"]
    summary = json.loads((out / "eval.json").read_text())
    assert [summary[s]["n_cases"] for s in ("complete", "incomplete", "all")] == [0, 2, 2]
    assert summary["complete"]["mre"] is None and summary["all"]["existence"]["fp"] == 2  # Rf placed, not there
    assert not any(p.name.startswith("eval") for p in run.iterdir())  # --out, not the run folder

    images = [image_folder / "p1.nii.gz", image_folder / "p2.nrrd"]
    argv = ["predict", "--run", str(run), *map(str, images), "--out", str(tmp_path / "pred"), "--no-progress"]
    assert main(argv) == 0
    assert "p1.nii.gz: 14/14 landmarks ->" in capsys.readouterr().out
    # the predicted points, measured against the label files in world mm, give the errors evaluate reported
    rows = {r.split(",")[0]: r.split(",") for r in (out / "eval.csv").read_text().splitlines()[1:]}
    for case_id, labels in (("p1", "p1.mrk.json"), ("p2", "p2.csv")):
        predicted, truth = read_markups(tmp_path / "pred" / f"{case_id}.mrk.json"), read_markups(image_folder / labels)
        distances = [np.linalg.norm(predicted[n] - truth[n]) for n in LANDMARK_NAMES[:-1]]
        reported = [float(e) for e in rows[case_id][9 : 9 + L - 1]]  # error_<name>_mm columns; Rf is empty
        np.testing.assert_allclose(distances, reported, rtol=1e-5)  # the affine is float32 in the NIfTI header
        assert rows[case_id][-1] == ""


def test_user_errors_exit_2_with_one_line(image_folder: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    data = ["--data", str(image_folder), "--split", "."]
    assert main(["evaluate", "--run", str(tmp_path / "norun"), *data]) == 2
    _one_error_line(capsys.readouterr().err, "evaluate", "norun' does not exist", "h3de-lite train --out")
    assert main(["evaluate", "--pretrained", "nope", *data, "--out", str(tmp_path / "o")]) == 2
    from h3de_lite.pretrained import available

    listed = ", ".join(available()) or "none"
    _one_error_line(capsys.readouterr().err, "evaluate", f"unknown pretrained model 'nope'; available: {listed}")
    assert main(["evaluate", "--pretrained", "nope", *data]) == 2
    _one_error_line(capsys.readouterr().err, "evaluate", "--pretrained needs --out DIR")
    assert main(["evaluate", "--run", str(tmp_path), "--data", str(tmp_path / "none")]) == 2
    _one_error_line(capsys.readouterr().err, "evaluate", "evaluation folder", "does not exist")

    run = make_run(tmp_path / "run", data=DATA_4MM)
    garbage = tmp_path / "broken.nii.gz"
    garbage.write_bytes(b"this is not an image")
    pred = ["--run", str(run), "--out", str(tmp_path / "pred"), "--no-progress"]
    assert main(["predict", str(garbage), *pred]) == 2
    _one_error_line(capsys.readouterr().err, "predict", "could not read NIfTI image", "broken.nii.gz")
    assert main(["predict", str(tmp_path / "missing.nrrd"), *pred]) == 2
    _one_error_line(capsys.readouterr().err, "predict", "missing.nrrd' does not exist")
    assert main(["predict", str(image_folder / "p1.mrk.json"), *pred]) == 2
    _one_error_line(capsys.readouterr().err, "predict", "is not a NIfTI (.nii, .nii.gz) or NRRD (.nrrd) image")
    assert main(["predict", str(image_folder / "p1.nii.gz"), "--pretrained", "nope", "--out", str(tmp_path)]) == 2
    _one_error_line(capsys.readouterr().err, "predict", "unknown pretrained model 'nope'")
    with pytest.raises(SystemExit, match="2"):  # --run and --pretrained together: argparse refuses
        main(["predict", str(garbage), "--run", str(run), "--pretrained", "x", "--out", str(tmp_path)])
    assert not (tmp_path / "pred").exists()
