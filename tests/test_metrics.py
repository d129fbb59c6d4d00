"""MRE / SDR / existence metrics against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from h3de_lite.metrics import existence_scores, radial_errors, summarize

NAN = float("nan")


def test_radial_errors_anisotropic_and_missing() -> None:
    target = np.array([[[0, 0, 0], [1, 1, 1], [NAN, NAN, NAN]], [[2, 2, 2], [0, 0, 0], [5, 5, 5]]], dtype=float)
    pred = np.array([[[3, 0, 0], [1, 2, 1], [4, 4, 4]], [[2, 2, 4], [1, 1, 1], [NAN, NAN, NAN]]], dtype=float)
    spacing = [0.5, 1.0, 2.0]
    err = radial_errors(pred, target, spacing)
    expected = np.array([[1.5, 1.0, NAN], [4.0, math.sqrt(0.25 + 1 + 4), NAN]])
    np.testing.assert_allclose(err, expected, equal_nan=True)

    per_case = radial_errors(pred, target, np.array([spacing, [1.0, 1.0, 1.0]]))
    np.testing.assert_allclose(per_case[1], [2.0, math.sqrt(3), NAN], equal_nan=True)

    as_tensor = radial_errors(torch.tensor(pred), torch.tensor(target), torch.tensor(spacing))
    assert isinstance(as_tensor, torch.Tensor)
    np.testing.assert_allclose(as_tensor.numpy(), expected, equal_nan=True)


def test_summarize_hand_computed() -> None:
    errors = np.array([[1.0, 2.0, NAN], [2.5, 3.5, 4.5]])
    out = summarize(errors, names=["a", "b", "c"])
    valid = np.array([1.0, 2.0, 2.5, 3.5, 4.5])
    assert out["n"] == 5
    assert out["mre"] == pytest.approx(2.7)
    assert out["std"] == pytest.approx(valid.std())
    assert out["sdr"] == {2.0: 40.0, 2.5: 60.0, 3.0: 60.0, 4.0: 80.0}
    assert out["per_landmark"]["a"]["mre"] == pytest.approx(1.75)
    assert out["per_landmark"]["c"]["n"] == 1
    assert out["per_landmark"]["c"]["sdr"][4.0] == 0.0


def test_summarize_all_missing_is_nan() -> None:
    out = summarize(np.full((2, 1), NAN))
    assert out["n"] == 0 and math.isnan(out["mre"])


def test_existence_scores() -> None:
    pred = np.array([[True, True, False, False, True]])
    true = np.array([[True, False, True, False, True]])
    out = existence_scores(pred, true)
    assert (out["tp"], out["fp"], out["fn"], out["tn"]) == (2, 1, 1, 1)
    assert out["precision"] == pytest.approx(2 / 3)
    assert out["recall"] == pytest.approx(2 / 3)
    assert out["f1"] == pytest.approx(2 / 3)
    assert out["accuracy"] == pytest.approx(0.6)
    assert existence_scores(torch.tensor([True]), torch.tensor([True]))["f1"] == 1.0
    as_numbers = existence_scores(np.array([[1, 1, 0, 0, 1]]), torch.tensor([[1.0, 0.0, 1.0, 0.0, 1.0]]))
    assert as_numbers == out  # 0/1 integers and floats read as booleans


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: radial_errors(np.zeros((2, 3)), np.zeros((3, 3)), [1, 1, 1]), "shape"),
        (lambda: radial_errors(np.zeros((2, 3)), np.zeros((2, 3)), [1, 0, 1]), "spacing"),
        (lambda: radial_errors(np.zeros((2, 3)), np.zeros((2, 3)), [1, NAN, 1]), "spacing"),
        (lambda: summarize(np.zeros((1, 2, 3))), "errors"),
        (lambda: summarize(np.zeros((1, 2)), names=["x"]), "names"),
        (lambda: existence_scores([True], [True, False]), "same shape"),
        (lambda: existence_scores(np.array([0.3, 1.0]), [True, True]), r"pred_present.*0\.3.*probabilities >= 0\.5"),
        (lambda: existence_scores(torch.tensor([0.7]), [True]), r"pred_present must be booleans.*threshold"),
        (lambda: existence_scores([NAN], [True]), r"pred_present.*nan.*threshold"),
        (lambda: existence_scores([True], np.array([2])), r"true_present must be booleans \(or 0/1\).*\[2\]"),
        (lambda: existence_scores(["yes"], [True]), r"pred_present must be booleans.*dtype"),
    ],
)
def test_bad_input_raises(call, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()
