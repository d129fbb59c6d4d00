"""The ``h3de-lite`` command line: the phantom sub-command writes a readable dataset; bad arguments fail clearly."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

import h3de_lite.data.phantom as phantom_module

from h3de_lite.cli import main
from h3de_lite.data import LandmarkDataset, list_mml_cases, read_mml_case


def test_phantom_command_writes_mml_layout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "phantom"
    argv = ["phantom", "--out", str(out), "--seed", "1", "--n-train", "2", "--n-val", "0", "--n-test", "1"]
    assert main([*argv, "--incomplete-fraction", "0.5", "--shape", "64", "64", "48", "--no-progress"]) == 0
    assert "wrote 3 cases" in capsys.readouterr().out
    assert list_mml_cases(out, "train") == ["0000", "0001"] and list_mml_cases(out, "test") == ["0002"]
    case = read_mml_case(out / "train", "0000")
    assert case.volume.shape == (64, 64, 48) and case.landmarks.shape == (14, 3)
    assert sum(not read_mml_case(out / "train", i).is_complete for i in ("0000", "0001")) == 1
    sample = LandmarkDataset(out, "test", crop_size=(32, 32, 32))[0]
    assert sample["image"].shape == (1, 32, 32, 32) and np.isfinite(sample["spacing"].numpy()).all()


@pytest.mark.parametrize(
    "argv",
    [
        ["phantom", "--out", "x", "--n-train", "-1"],
        ["phantom", "--out", "x", "--incomplete-fraction", "1.5"],
        ["phantom"],
        ["unknown"],
    ],
)
def test_bad_arguments_exit_with_usage_error(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2


def test_value_errors_become_a_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["phantom", "--out", str(tmp_path), "--shape", "8", "8", "8", "--n-train", "1", "--no-progress"])
    assert code == 2
    assert "error:" in capsys.readouterr().err


SMALL = ["--shape", "32", "32", "24", "--n-val", "0", "--no-progress"]


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``root`` (and root itself) with its size and modification time in ns."""
    paths = [root, *sorted(root.rglob("*"))]
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in paths}


@pytest.fixture
def no_generation(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if a case is generated: the output checks must come first."""

    def fail(**kwargs: object) -> None:
        raise AssertionError("a case was generated before the output folder was checked")

    monkeypatch.setattr(phantom_module, "generate_phantom", fail)


def _one_error_line(err: str, *fragments: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("h3de-lite phantom: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.mark.parametrize("below", ["", "sub"])
def test_out_that_is_a_file_exits_2_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_generation: None, below: str
) -> None:
    file = tmp_path / "notes.txt"
    file.write_text("keep me")
    out = file / below if below else file
    before = _snapshot(tmp_path)
    assert main(["phantom", "--out", str(out), "--n-train", "1", "--n-test", "0", *SMALL]) == 2
    captured = capsys.readouterr()
    _one_error_line(captured.err, repr(str(out)), f"{str(file)!r} is a file", "choose another output folder")
    assert captured.out == "" and _snapshot(tmp_path) == before and file.read_text() == "keep me"


def test_existing_dataset_needs_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    out = tmp_path / "data"
    assert main(["phantom", "--out", str(out), "--seed", "1", "--n-train", "1", "--n-test", "1", *SMALL]) == 0
    assert list_mml_cases(out, "train") == ["0000"] and list_mml_cases(out, "test") == ["0001"]
    old_train = read_mml_case(out / "train", "0000")
    (out / "train" / "notes.txt").write_text("not a case file")
    capsys.readouterr()

    before = _snapshot(out)
    with monkeypatch.context() as patch:  # refused before any case is generated
        patch.setattr(phantom_module, "generate_phantom", lambda **kwargs: pytest.fail("generated a case"))
        argv = ["phantom", "--out", str(out), "--seed", "2", "--n-train", "2", "--n-test", "0", *SMALL]
        assert main(argv) == 2
    _one_error_line(capsys.readouterr().err, repr(str(out)), "already holds a dataset", "--overwrite")
    assert _snapshot(out) == before  # nothing written, nothing deleted

    argv = ["phantom", "--out", str(out), "--seed", "2", "--n-train", "1", "--n-test", "0", *SMALL]
    assert main([*argv, "--overwrite"]) == 0
    assert list_mml_cases(out, "train") == ["0000"] and list_mml_cases(out, "test") == []  # old test case 0001 gone
    assert sorted(p.name for p in (out / "test").iterdir()) == []
    assert not np.array_equal(read_mml_case(out / "train", "0000").spacing, old_train.spacing)  # the new case
    assert (out / "train" / "notes.txt").read_text() == "not a case file"  # only case files are deleted


def test_library_refuses_before_generating(tmp_path: Path, no_generation: None) -> None:
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "0007_volume.nrrd").write_bytes(b"old")
    with pytest.raises(ValueError, match=r"already holds a dataset \(1 files in test/\); pass overwrite=True"):
        phantom_module.write_phantom_dataset(tmp_path, n_train=1, n_val=0, n_test=0, shape=(32, 32, 24))
    (tmp_path / "val").write_text("")
    with pytest.raises(ValueError, match=r"val' is a file, not a split folder"):
        phantom_module.write_phantom_dataset(tmp_path, n_train=1, n_val=0, n_test=0, overwrite=True)
    assert (tmp_path / "test" / "0007_volume.nrrd").read_bytes() == b"old"


@pytest.mark.skipif(
    os.geteuid() == 0,
    reason="running as root: chmod 0o500 does not stop root writing; test_failed_write_probe_exits_2 covers the probe",
)
def test_unwritable_out_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str], no_generation: None) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        assert main(["phantom", "--out", str(locked), "--n-train", "1", "--n-test", "0", *SMALL]) == 2
    finally:
        locked.chmod(0o700)
    _one_error_line(capsys.readouterr().err, "cannot write into output folder", repr(str(locked)), "permissions")
    assert list(locked.iterdir()) == []


def test_failed_write_probe_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str], no_generation: None,
                                    monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """As root no permission bit blocks a write: simulate a folder that refuses the probe file (read-only mount)."""
    import tempfile

    def refuse(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "TemporaryFile", refuse)
    out = tmp_path / "ro"
    assert main(["phantom", "--out", str(out), "--n-train", "1", "--n-test", "0", *SMALL]) == 2
    _one_error_line(capsys.readouterr().err, "cannot write into output folder", repr(str(out)), "Permission denied",
                    "fix its permissions")  # fmt: skip


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("train-cli") / "data"
    argv = ["phantom", "--out", str(out), "--n-train", "2", "--n-val", "1", "--n-test", "0"]
    assert main([*argv, "--shape", "64", "64", "48", "--incomplete-fraction", "0", "--no-progress"]) == 0
    return out


def _train_argv(data: Path, run: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(data), "--out", str(run), "--crop", "64", "32", "32", "--epochs", "1",
            "--batch-size", "2", "--loss", "softmax_ce", "--no-progress", *extra]  # fmt: skip


def test_train_command_writes_a_run_and_refuses_to_mix_runs(
    small_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    run = tmp_path / "run"
    assert main(_train_argv(small_dataset, run)) == 0
    assert "trained 1 epochs" in capsys.readouterr().out
    assert {p.name for p in run.iterdir()} == {"config.json", "history.json", "last.pt", "best.pt"}
    config = json.loads((run / "config.json").read_text())
    assert config["model"] == {"kind": "h3de", "preset": "tiny", "overrides": {"stem_channels": 16}}  # the recipe's
    assert config["data"]["p_zoom"] == 0.0 and config["train"]["sigma"] == 1.5
    assert config["inference"] == {"tta": "flip"}  # the recipe's test-time mirror averaging
    assert config["data"]["spacing"] == 1.5 and config["data"]["crop"] == [64, 32, 32]
    assert config["data"]["recipe"] == "tiny"
    assert config["train"]["schedule"] == "cosine" and config["train"]["epochs"] == 1  # recipe, then the flags
    assert config["train"]["heatmap_loss"] == "softmax_ce" and config["train"]["val_roi_size"] == [64, 32, 32]
    history = json.loads((run / "history.json").read_text())
    assert len(history["epochs"]) == 1 and history["epochs"][0]["val_mre"] > 0

    before = {p.name: p.stat().st_mtime_ns for p in run.iterdir()}
    assert main(_train_argv(small_dataset, run)) == 2  # another run in the same folder
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(run) in err[0] and "--resume" in err[0] and "--overwrite" in err[0]
    assert before == {p.name: p.stat().st_mtime_ns for p in run.iterdir()}


def test_train_zoomed_items_and_validation_strategy_reach_the_run(small_dataset: Path, tmp_path: Path) -> None:
    import json

    run = tmp_path / "zoom"
    assert main(_train_argv(small_dataset, run, "--p-zoom", "0.5", "--val-strategy", "coarse_to_fine")) == 0
    config = json.loads((run / "config.json").read_text())
    assert config["data"]["p_zoom"] == 0.5 and config["train"]["val_strategy"] == "coarse_to_fine"
    history = json.loads((run / "history.json").read_text())
    assert history["epochs"][0]["val_mre"] > 0  # validated coarse-to-fine


def test_train_anchor_run_records_the_recipes_test_time_flip(small_dataset: Path, tmp_path: Path) -> None:
    import json

    from h3de_lite.evaluation import load_predictor

    run = tmp_path / "anchor"
    argv = _train_argv(small_dataset, run, "--head", "anchor", "--hard-negatives", "3", "--landmark-existence", "0.5")
    assert main(argv) == 0
    config = json.loads((run / "config.json").read_text())
    assert config["inference"] == {"tta": "flip"}  # h3de_lite.tta mirrors the anchor grid too
    assert config["train"]["hard_negative_ratio"] == 3.0
    assert config["train"]["lambda_landmark"] == 0.5
    history = json.loads((run / "history.json").read_text())
    assert history["epochs"][0]["loss"]["landmark"] > 0  # the term was trained and logged
    assert load_predictor(run, device="cpu").tta == "flip"


def test_train_seed_sets_the_initial_weights(small_dataset: Path, tmp_path: Path, monkeypatch) -> None:
    # --seed must reach the weights the network starts from, not only data order and crops: record them at fit's door.
    import h3de_lite.training as training

    starts = []

    def record(model, *args, **kwargs):
        starts.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
        return {"epochs": [], "best_epoch": None}

    monkeypatch.setattr(training, "fit", record)
    for name, seed in (("a", "1"), ("b", "1"), ("c", "2")):
        torch.manual_seed(123 + len(starts))  # whatever the global generator holds before the command
        assert main(_train_argv(small_dataset, tmp_path / name, "--seed", seed)) == 0
    assert torch.equal(starts[0], starts[1]) and not torch.equal(starts[0], starts[2])


def test_train_augmentation_follows_the_recipe_unless_told(small_dataset: Path, tmp_path: Path, monkeypatch) -> None:
    # The tiny recipe trains with flips, rotations/scalings and intensity jitter; --no-augment and --augment override
    # the recipe either way, and config.json → data records what ran.
    import h3de_lite.training as training
    from h3de_lite.data.augment import Compose, IntensityJitter, RandomFlipLR, RandomRotateScale

    seen = []

    def record(model, train_data, *args, data_config=None, **kwargs):
        seen.append((train_data.augment, train_data.intensity_augment, data_config["augment"]))
        return {"epochs": [], "best_epoch": None}

    monkeypatch.setattr(training, "fit", record)
    for name, extra in (("recipe", ()), ("off", ("--no-augment",)), ("paper", ("--preset", "paper", "--augment"))):
        assert main(_train_argv(small_dataset, tmp_path / name, *extra)) == 0
    (spatial, intensity, recorded), (none, no_jitter, off), (paper_spatial, _, paper_recorded) = seen
    assert isinstance(spatial, Compose) and [type(t) for t in spatial.transforms] == [RandomFlipLR, RandomRotateScale]
    assert isinstance(intensity, IntensityJitter) and recorded is True
    assert none is None and no_jitter is None and off is False
    assert isinstance(paper_spatial, Compose) and paper_recorded is True  # the paper recipe has none by default


@pytest.mark.parametrize(
    ("argv_of", "match"),
    [
        (lambda d, t: _train_argv(t / "nowhere", t / "run"), "does not exist"),
        (lambda d, t: _train_argv(d, t / "run", "--crop", "32", "32", "40"), "multiple of 32"),
        (lambda d, t: _train_argv(d, t / "run", "--crop", "32", "32", "32"), "more than one voxel"),
        (lambda d, t: _train_argv(d, t / "run", "--model", "vnet", "--head", "anchor"), "needs --model h3de"),
        (lambda d, t: _train_argv(d, t / "run", "--resume", "--overwrite"), "only one"),
        (lambda d, t: _train_argv(d, t / "run", "--model", "unet3d", "--checkpointing"), "needs --model h3de"),
        (lambda d, t: _train_argv(d, t / "run", "--subset", "incomplete"), "empty"),
    ],
)
def test_train_command_user_errors_exit_2(small_dataset, tmp_path, capsys, argv_of, match) -> None:
    assert main(argv_of(small_dataset, tmp_path)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("h3de-lite train: error:") and match in err[0]
    assert not (tmp_path / "run").exists()


def test_train_help_explains_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit, match="0"):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for option in ("--data", "--out", "--preset", "--model", "--head", "--anchors", "--epochs", "--batch-size", "--lr",
                   "--crop", "--spacing", "--subset", "--device", "--amp", "--compile", "--seed", "--workers",
                   "--resume", "--checkpoint-every", "--overwrite", "--loss", "--augment",
                   "--checkpointing"):  # fmt: skip
        assert option in text, option


def test_train_help_states_the_recipes_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    """The defaults the help names are the ones a run takes (they were typed in once, and went stale: 'tiny 40')."""
    from h3de_lite.training import RECIPES

    with pytest.raises(SystemExit, match="0"):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    tiny, paper = RECIPES["tiny"], RECIPES["paper"]
    assert f"tiny {tiny.train['epochs']}, paper 200" in text
    assert f"tiny {tiny.train['lr']}, paper 0.001" in text
    assert f"tiny {tiny.spacing}, paper none" in text
    assert f"tiny {tiny.p_background}, paper {paper.p_background}" in text
    assert "tiny 40" not in text and "(default 0.1)" not in text
    assert "Gaussian target sigma in voxels (eq. 1; default: tiny 1.5, paper 2.0)" in text  # recipe, TrainConfig's
    assert f"tiny {tiny.p_zoom}, paper 0.0" in text and "tiny sliding, paper sliding" in text
