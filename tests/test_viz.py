"""Tests of the slice-panel plot: figure structure, aspect ratio from spacing, landmark overlay, errors."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.figure import Figure

from h3de_lite.viz import plot_orthogonal_slices


@pytest.fixture
def volume() -> np.ndarray:
    return np.random.default_rng(0).normal(0.0, 100.0, size=(40, 30, 20)).astype(np.float32)


def _labels(ax) -> list[str]:
    return [t.get_text() for t in ax.texts]


def test_returns_figure_with_three_axes(volume: np.ndarray) -> None:
    fig = plot_orthogonal_slices(volume, center=(20, 15, 10), title="t")
    assert isinstance(fig, Figure) and len(fig.axes) == 3
    assert [ax.get_images()[0].get_array().shape for ax in fig.axes] == [(30, 40), (20, 40), (20, 30)]
    plt.close(fig)


def test_slices_show_the_plane_through_the_centre(volume: np.ndarray) -> None:
    fig = plot_orthogonal_slices(volume, center=(5.2, 7.8, 3.4))
    axial, coronal, sagittal = (ax.get_images()[0].get_array() for ax in fig.axes)
    assert np.array_equal(axial, volume[:, :, 3].T)
    assert np.array_equal(coronal, volume[:, 8, :].T)
    assert np.array_equal(sagittal, volume[5, :, :].T)
    plt.close(fig)


def test_aspect_follows_spacing(volume: np.ndarray) -> None:
    fig = plot_orthogonal_slices(volume, center=(20, 15, 10), spacing=(0.5, 0.5, 1.25))
    aspects = [ax.get_aspect() for ax in fig.axes]
    assert aspects == pytest.approx([1.0, 2.5, 2.5])
    plt.close(fig)


def test_landmarks_near_each_plane_are_labelled(volume: np.ndarray) -> None:
    landmarks = np.array([[20.0, 15.0, 10.0], [2.0, 15.0, 18.0], [np.nan, np.nan, np.nan]])
    fig = plot_orthogonal_slices(volume, center=(20, 15, 10), landmarks=landmarks, names=["A", "B", "C"],
                                 spacing=(1.0, 1.0, 1.0))  # fmt: skip
    axial, coronal, sagittal = fig.axes
    assert _labels(axial) == ["A"]  # B is 8 mm above the axial plane
    assert _labels(coronal) == ["A", "B"]  # both on the plane axis 1 = 15
    assert _labels(sagittal) == ["A"]  # B is 18 mm from the sagittal plane; C (NaN) never drawn
    plt.close(fig)


def test_draws_into_given_axes(volume: np.ndarray) -> None:
    fig, axes = plt.subplots(2, 3)
    out = plot_orthogonal_slices(volume, center=(1, 1, 1), axes=axes[1])
    assert out is fig and all(ax.get_images() for ax in axes[1]) and not any(ax.get_images() for ax in axes[0])
    plt.close(fig)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"center": (1, 2)}, "center"),
        ({"center": (100, 1, 1)}, "outside"),
        ({"center": (1, 1, 1), "spacing": (1, 0, 1)}, "spacing"),
        ({"center": (1, 1, 1), "window": (10, 0)}, "window"),
        ({"center": (1, 1, 1), "landmarks": np.zeros((2, 2))}, "landmarks"),
        ({"center": (1, 1, 1), "landmarks": np.zeros((2, 3)), "names": ["a"]}, "names"),
    ],
)
def test_invalid_arguments_raise(volume: np.ndarray, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        plot_orthogonal_slices(volume, **kwargs)


def test_rejects_non_3d_volume() -> None:
    with pytest.raises(ValueError, match="3D"):
        plot_orthogonal_slices(np.zeros((4, 4)), center=(1, 1, 1))
