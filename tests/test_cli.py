"""The ``h3de-lite`` command line: the phantom sub-command writes a readable dataset; bad arguments fail clearly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

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
