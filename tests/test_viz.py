"""Tests of h3de_lite.viz: every helper renders (to an in-memory PNG, or a plotly figure dict), draws what it is
given where it belongs (truth green, prediction red), computes its curves right, and refuses bad input."""

from __future__ import annotations

import io
import sys
import types

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.colors import to_hex
from matplotlib.figure import Figure
from matplotlib.text import Text

from h3de_lite import viz
from h3de_lite.metrics import existence_scores, summarize
from h3de_lite.viz import (
    PREDICTION_COLOR,
    TRUTH_COLOR,
    existence_pr_curve,
    existence_pr_curve_at,
    plot_error_distributions,
    plot_existence_pr,
    plot_mips,
    plot_orthogonal_slices,
    plot_sdr_curves,
    plot_worst_cases,
    sdr_curve,
    volume_figure_3d,
    worst_landmarks,
)

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def volume() -> np.ndarray:
    return np.random.default_rng(0).normal(0.0, 100.0, size=(40, 30, 20)).astype(np.float32)


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _labels(ax) -> list[str]:
    return [t.get_text() for t in ax.texts]


def _by_gid(ax, prefix: str) -> dict[str, object]:
    children = ax.get_children()
    return {a.get_gid(): a for a in children if isinstance(a.get_gid(), str) and a.get_gid().startswith(prefix)}


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=50)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------------- slices
def test_returns_figure_with_three_image_panels_and_a_legend_cell(volume: np.ndarray) -> None:
    fig = plot_orthogonal_slices(volume, center=(20, 15, 10), title="t", landmarks=np.array([[20.0, 15.0, 10.0]]))
    assert isinstance(fig, Figure) and len(fig.axes) == 4  # 2 × 2: three planes and the legend
    assert [ax.get_images()[0].get_array().shape for ax in fig.axes[:3]] == [(30, 40), (20, 40), (20, 30)]
    assert not fig.axes[3].get_images() and fig.axes[3].get_legend() is not None
    assert _png(fig).startswith(PNG)


def test_slices_show_the_plane_through_the_centre(volume: np.ndarray) -> None:
    fig = plot_orthogonal_slices(volume, center=(5.2, 7.8, 3.4))
    axial, coronal, sagittal = (ax.get_images()[0].get_array() for ax in fig.axes[:3])
    assert np.array_equal(axial, volume[:, :, 3].T)
    assert np.array_equal(coronal, volume[:, 8, :].T)
    assert np.array_equal(sagittal, volume[5, :, :].T)


def test_aspect_follows_spacing(volume: np.ndarray) -> None:
    fig = plot_orthogonal_slices(volume, center=(20, 15, 10), spacing=(0.5, 0.5, 1.25))
    aspects = [ax.get_aspect() for ax in fig.axes[:3]]
    assert aspects == pytest.approx([1.0, 2.5, 2.5])


def test_landmarks_near_each_plane_are_labelled(volume: np.ndarray) -> None:
    landmarks = np.array([[20.0, 15.0, 10.0], [2.0, 15.0, 18.0], [np.nan, np.nan, np.nan]])
    fig = plot_orthogonal_slices(volume, center=(20, 15, 10), landmarks=landmarks, names=["A", "B", "C"],
                                 spacing=(1.0, 1.0, 1.0))  # fmt: skip
    axial, coronal, sagittal = fig.axes[:3]
    assert _labels(axial) == ["A"]  # B is 8 mm above the axial plane
    assert sorted(_labels(coronal)) == ["A", "B"]  # both on the plane axis 1 = 15
    assert _labels(sagittal) == ["A"]  # B is 18 mm from the sagittal plane; C (NaN) never drawn


def test_truth_is_green_and_prediction_red_at_their_coordinates(volume: np.ndarray) -> None:
    truth = np.array([[20.0, 15.0, 10.0], [5.0, 5.0, 10.0]])
    prediction = np.array([[22.0, 13.0, 11.0], [np.nan, np.nan, np.nan]])  # B predicted absent
    fig = plot_orthogonal_slices(volume, center=(20, 15, 10), landmarks=truth, prediction=prediction,
                                 names=["A", "B"])  # fmt: skip
    axial = fig.axes[0]
    truth_markers, pred_markers = _by_gid(axial, "truth:"), _by_gid(axial, "prediction:")
    assert set(truth_markers) == {"truth:A", "truth:B"} and set(pred_markers) == {"prediction:A"}
    assert to_hex(truth_markers["truth:A"].get_markeredgecolor()) == TRUTH_COLOR
    assert to_hex(pred_markers["prediction:A"].get_color()) == PREDICTION_COLOR
    assert (truth_markers["truth:A"].get_xdata()[0], truth_markers["truth:A"].get_ydata()[0]) == (20.0, 15.0)
    assert (pred_markers["prediction:A"].get_xdata()[0], pred_markers["prediction:A"].get_ydata()[0]) == (22.0, 13.0)
    assert sorted(_labels(axial)) == ["A", "B"]  # each landmark named once


def test_draws_into_given_axes(volume: np.ndarray) -> None:
    fig, axes = plt.subplots(2, 3)
    out = plot_orthogonal_slices(volume, center=(1, 1, 1), axes=axes[1])
    assert out is fig and all(ax.get_images() for ax in axes[1]) and not any(ax.get_images() for ax in axes[0])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"center": (1, 2)}, "center"),
        ({"center": (100, 1, 1)}, "outside"),
        ({"center": (1, 1, 1), "spacing": (1, 0, 1)}, "spacing"),
        ({"center": (1, 1, 1), "window": (10, 0)}, "window"),
        ({"center": (1, 1, 1), "landmarks": np.zeros((2, 2))}, "truth"),
        ({"center": (1, 1, 1), "landmarks": np.zeros((2, 3)), "names": ["a"]}, "names"),
        ({"center": (1, 1, 1), "landmarks": np.zeros((2, 3)), "prediction": np.zeros((3, 3))}, "prediction"),
    ],
)
def test_invalid_arguments_raise(volume: np.ndarray, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        plot_orthogonal_slices(volume, **kwargs)


def test_rejects_non_3d_volume() -> None:
    with pytest.raises(ValueError, match="3D"):
        plot_orthogonal_slices(np.zeros((4, 4)), center=(1, 1, 1))


# ---------------------------------------------------------------------------------------------------- MIPs
def test_mips_project_the_maximum_and_every_landmark(volume: np.ndarray) -> None:
    truth = np.array([[10.0, 12.0, 3.0], [30.0, 20.0, 15.0]])
    prediction = truth + np.array([[1.0, -2.0, 0.5], [0.0, 0.0, 0.0]])
    fig = plot_mips(volume, truth=truth, prediction=prediction, names=["La", "Ra"], spacing=(0.5, 0.5, 1.0))
    axial, coronal = fig.axes
    assert np.array_equal(axial.get_images()[0].get_array(), volume.max(axis=2).T)
    assert np.array_equal(coronal.get_images()[0].get_array(), volume.max(axis=1).T)
    assert coronal.get_aspect() == pytest.approx(2.0)
    image = volume.max(axis=2)  # default window: 1st to 99.5th percentile of each projection
    assert axial.get_images()[0].get_clim() == pytest.approx((np.percentile(image, 1.0), np.percentile(image, 99.5)))
    # both landmarks on both projections whatever their depth; the pair line joins truth to prediction
    for ax, (h, v) in ((axial, (0, 1)), (coronal, (0, 2))):
        assert set(_by_gid(ax, "truth:")) == {"truth:La", "truth:Ra"}
        pair = _by_gid(ax, "pair:")["pair:La"]
        assert list(pair.get_xdata()) == [truth[0, h], prediction[0, h]]
        assert list(pair.get_ydata()) == [truth[0, v], prediction[0, v]]
    assert _png(fig).startswith(PNG)


def test_mips_three_views_use_two_columns(volume: np.ndarray) -> None:
    fig = plot_mips(volume, views=("axial", "coronal", "sagittal"))
    assert len(fig.axes) == 3
    columns = {round(ax.get_position().x0, 2) for ax in fig.axes}
    assert len(columns) == 2  # never more than two panels a row


def test_labels_of_clustered_landmarks_do_not_overlap() -> None:
    volume = np.zeros((64, 64, 16), np.float32)
    truth = np.array([[30.0, 30.0, 8.0], [31.0, 30.5, 8.0], [30.5, 31.0, 8.0], [31.5, 31.5, 8.0], [29.5, 30.0, 8.0]])
    fig = plot_mips(volume, truth=truth, names=["La", "Lb", "Lc", "Ld", "Le"], views=("axial",))
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    boxes = [Text.get_window_extent(t, renderer) for t in fig.axes[0].texts]  # the text, without its leader line
    assert len(boxes) == 5
    for i in range(5):
        for j in range(i + 1, 5):
            assert not boxes[i].overlaps(boxes[j]), (fig.axes[0].texts[i].get_text(), fig.axes[0].texts[j].get_text())


@pytest.mark.parametrize("kwargs, match", [({"views": ("top",)}, "views"), ({"views": ()}, "views"),
                                           ({"truth": np.zeros((2, 3)), "names": ["a"]}, "names")])  # fmt: skip
def test_mips_invalid_arguments(volume: np.ndarray, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        plot_mips(volume, **kwargs)


# ---------------------------------------------------------------------------------------------------- worst cases
def test_worst_landmarks_rank_measured_errors_only() -> None:
    errors = np.array([[1.0, np.nan, 7.0], [5.0, 2.0, np.nan]])
    assert worst_landmarks(errors, k=2) == [(0, 2, 7.0), (1, 0, 5.0)]
    assert len(worst_landmarks(errors, k=10)) == 4
    assert worst_landmarks(np.full((2, 2), np.nan), k=3) == []
    with pytest.raises(ValueError, match="k must"):
        worst_landmarks(errors, k=0)


def test_worst_cases_show_truth_and_prediction_slices() -> None:
    rng = np.random.default_rng(1)
    volumes = [rng.normal(size=(40, 40, 20)).astype(np.float32), rng.normal(size=(30, 36, 24)).astype(np.float32)]
    truth = np.array([[[10.0, 10.0, 5.0], [20.0, 20.0, 10.0]], [[8.0, 9.0, 4.0], [15.0, 15.0, 12.0]]])
    prediction = truth.copy()
    prediction[1, 1] += [4.0, 0.0, 3.0]  # case 1, landmark Lb: the worst
    prediction[0, 0] += [1.0, 0.0, 0.0]
    errors = np.linalg.norm(prediction - truth, axis=-1)
    fig = plot_worst_cases(volumes, truth=truth, prediction=prediction, errors=errors, spacing=np.ones(3),
                           names=["La", "Lb"], case_ids=["c0", "c1"], k=2, margin_mm=5.0)  # fmt: skip
    assert len(fig.axes) == 4  # two rows of (truth slice, prediction slice)
    left, right = fig.axes[0], fig.axes[1]
    assert "c1 · Lb · error 5.0 mm" in left.get_title() and "axis 2 = 12" in left.get_title()
    assert "axis 2 = 15" in right.get_title() and "+3.0 mm" in right.get_title()
    # the same in-plane box on both panels: truth ± margin and prediction ± margin, rows of the crop
    assert np.array_equal(left.get_images()[0].get_array(), volumes[1][10:25, 10:21, 12].T)
    assert np.array_equal(right.get_images()[0].get_array(), volumes[1][10:25, 10:21, 15].T)
    marker = _by_gid(left, "prediction:")["prediction:c1:Lb"]
    assert (marker.get_xdata()[0], marker.get_ydata()[0]) == (19.0, 15.0)
    assert _png(fig).startswith(PNG)


def test_worst_cases_without_errors_and_bad_shapes() -> None:
    truth = np.zeros((1, 2, 3))
    fig = plot_worst_cases([np.zeros((8, 8, 8))], truth=truth, prediction=truth, errors=np.full((1, 2), np.nan),
                           spacing=np.ones(3), names=["a", "b"])  # fmt: skip
    assert "no measured error" in fig.axes[0].texts[0].get_text()
    with pytest.raises(ValueError, match="errors"):
        plot_worst_cases([np.zeros((8, 8, 8))], truth=truth, prediction=truth, errors=np.zeros((2, 2)),
                         spacing=np.ones(3), names=["a", "b"])  # fmt: skip
    with pytest.raises(ValueError, match="N = 2"):
        plot_worst_cases([np.zeros((8, 8, 8))] * 2, truth=truth, prediction=truth, errors=np.zeros((1, 2)),
                         spacing=np.ones(3), names=["a", "b"])  # fmt: skip


# ---------------------------------------------------------------------------------------------------- errors, SDR
@pytest.mark.parametrize("kind", ["box", "violin"])
def test_error_distributions_medians_and_missing_landmarks(kind: str) -> None:
    a = np.array([[1.0, 4.0, np.nan], [3.0, 6.0, np.nan], [2.0, 8.0, np.nan]])
    b = np.array([[2.0, 1.0, 5.0], [4.0, np.nan, np.nan], [6.0, np.nan, np.nan]])
    fig = plot_error_distributions({"heatmap": a, "anchor": b}, names=["La", "Lb", "Lc"], kind=kind)
    ax = fig.axes[0]
    medians = {gid: artist.get_ydata()[0] for gid, artist in _by_gid(ax, "median:").items()}
    assert medians == {"median:heatmap:La": 2.0, "median:heatmap:Lb": 6.0, "median:anchor:La": 4.0,
                       "median:anchor:Lb": 1.0, "median:anchor:Lc": 5.0}  # fmt: skip
    assert "n/a" in _labels(ax)  # heatmap has no error at Lc
    assert [t.get_text() for t in ax.get_xticklabels()] == ["La", "Lb", "Lc"]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["heatmap", "anchor"]
    assert _png(fig).startswith(PNG)


@pytest.mark.parametrize(
    "errors, kwargs, match",
    [
        (np.zeros((2, 3)), {"names": ["a"]}, "names"),
        (np.zeros((2, 3)), {"names": ["a", "b", "c"], "kind": "bar"}, "kind"),
        (-np.ones((2, 3)), {"names": ["a", "b", "c"]}, "non-negative"),
        (np.zeros((2, 3, 1)), {"names": ["a", "b", "c"]}, r"\(N, L\)"),
        ({"a": np.zeros((2, 3)), "b": np.zeros((2, 2))}, {"names": ["a", "b", "c"]}, "same number"),
    ],
)
def test_error_distributions_invalid(errors, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        plot_error_distributions(errors, **kwargs)


def test_sdr_curve_matches_the_table_metric() -> None:
    errors = np.random.default_rng(2).gamma(2.0, 1.5, size=(6, 14))
    errors[0, :3] = np.nan
    table = summarize(errors)["sdr"]
    assert sdr_curve(errors, radii=list(table)) == pytest.approx(list(table.values()))
    curve = sdr_curve(np.array([1.0, 2.0, 3.0, np.nan]), radii=[0.0, 2.0, 10.0])
    assert curve.tolist() == pytest.approx([0.0, 200 / 3, 100.0])
    assert np.isnan(sdr_curve(np.full(3, np.nan), radii=[1.0])).all()
    with pytest.raises(ValueError, match="radii"):
        sdr_curve(errors, radii=[-1.0])


def test_sdr_curves_plot_one_line_per_model() -> None:
    errors = {"heatmap": np.array([[1.0, 3.0]]), "unet3d": np.array([[np.nan, 5.0]])}
    fig = plot_sdr_curves(errors, radii=[0.0, 2.0, 4.0, 6.0])
    lines = _by_gid(fig.axes[0], "sdr:")
    assert list(lines["sdr:heatmap"].get_ydata()) == [0.0, 50.0, 100.0, 100.0]
    assert list(lines["sdr:unet3d"].get_ydata()) == [0.0, 0.0, 0.0, 100.0]
    dotted = [line for line in fig.axes[0].get_lines() if line.get_linestyle() == ":"]
    assert [line.get_xdata()[0] for line in dotted] == [2.0, 2.5, 3.0, 4.0]  # the paper's radii
    assert _png(fig).startswith(PNG)


# ---------------------------------------------------------------------------------------------------- existence
def test_existence_pr_curve_known_answer() -> None:
    scores = np.array([[0.9, 0.8, 0.3], [0.6, 0.2, 0.1]])
    truth = np.array([[True, True, False], [True, False, True]])
    curve = existence_pr_curve(scores, truth)
    assert curve["threshold"].tolist() == [0.1, 0.2, 0.3, 0.6, 0.8, 0.9]
    # at 0.6: called present 0.9, 0.8, 0.6, all truly present → precision 1, recall 3/4
    i = curve["threshold"].tolist().index(0.6)
    assert (curve["precision"][i], curve["recall"][i], curve["called"][i]) == (1.0, 0.75, 0.5)
    for th, p in zip(curve["threshold"], curve["precision"], strict=True):
        assert p == pytest.approx(existence_scores(scores >= th, truth)["precision"])
    above = existence_pr_curve(scores, truth, thresholds=[0.95])
    assert np.isnan(above["precision"][0]) and above["recall"][0] == 0.0  # nothing called present
    at = existence_pr_curve_at(curve, 0.5)  # score ≥ 0.5 calls present what score ≥ 0.6 does
    assert at["threshold"] == 0.6 and (at["precision"], at["recall"]) == (1.0, 0.75)
    assert existence_pr_curve_at(curve, -np.inf)["recall"] == 1.0  # everything present
    assert existence_pr_curve_at(curve, 0.95)["recall"] == 0.0
    with pytest.raises(ValueError, match="same shape"):
        existence_pr_curve(scores, truth[:, :2])
    with pytest.raises(ValueError, match="finite"):
        existence_pr_curve(np.full((1, 2), np.nan), np.ones((1, 2), bool))


def test_existence_pr_plot() -> None:
    scores = np.array([[0.9, 0.8, 0.3], [0.6, 0.2, 0.1]])
    truth = np.array([[True, True, False], [True, False, True]])
    curve = existence_pr_curve(scores, truth)
    fig = plot_existence_pr({"anchor": curve}, operating_points={"anchor": 0.5}, prevalence=float(truth.mean()))
    left, right = fig.axes
    pr = _by_gid(left, "pr:")["pr:anchor"]
    defined = ~np.isnan(curve["precision"])
    assert list(pr.get_xdata()) == list(curve["recall"][defined])
    assert list(_by_gid(right, "f1:")["f1:anchor"].get_xdata()) == list(curve["called"])  # share called present
    dot = _by_gid(left, "operating:")["operating:anchor"]
    assert (dot.get_xdata()[0], dot.get_ydata()[0]) == (0.75, 1.0)
    assert _png(fig).startswith(PNG)
    with pytest.raises(ValueError, match="lacks"):
        plot_existence_pr({"anchor": {"threshold": np.zeros(1)}})


# ---------------------------------------------------------------------------------------------------- plotly 3D
def _ball(shape=(24, 24, 24), centre=(12.0, 10.0, 14.0), radius=6.0) -> np.ndarray:
    grid = np.stack(np.meshgrid(*(np.arange(n) for n in shape), indexing="ij"), axis=-1)
    return (1000.0 * (np.linalg.norm(grid - np.asarray(centre), axis=-1) <= radius)).astype(np.float32)


def test_volume_figure_traces_colours_and_coordinates() -> None:
    pytest.importorskip("plotly")
    truth = np.array([[2.0, 3.0, 4.0], [np.nan, np.nan, np.nan], [5.0, 5.0, 5.0]])
    prediction = np.array([[2.0, 3.0, 6.0], [1.0, 1.0, 1.0], [np.nan, np.nan, np.nan]])
    spacing = (0.5, 0.5, 2.0)
    fig = volume_figure_3d(_ball(), truth=truth, prediction=prediction, names=["La", "Lb", "Lc"], spacing=spacing,
                           levels=(300.0,), level_names=("bone",), level_colors=("#ffffff",), opacities=(0.3,),
                           method="isosurface")  # fmt: skip
    data = fig.to_plotly_json()["data"]
    assert [(t["type"], t["name"]) for t in data] == [("isosurface", "bone"), ("scatter3d", "ground truth"),
                                                      ("scatter3d", "prediction"), ("scatter3d", "error")]  # fmt: skip
    truth_trace, pred_trace, error_trace = fig.data[1], fig.data[2], fig.data[3]
    assert truth_trace.marker.color == TRUTH_COLOR and pred_trace.marker.color == PREDICTION_COLOR
    # coordinates in mm (voxel × spacing); NaN rows left out
    assert list(truth_trace.x) == [1.0, 2.5] and list(truth_trace.z) == [8.0, 10.0]
    assert list(pred_trace.x) == [1.0, 0.5] and list(pred_trace.z) == [12.0, 2.0]
    assert list(truth_trace.text) == ["La", "Lc"]
    assert pred_trace.hovertext[0] == "La (prediction): 4.0 mm from truth"
    assert list(error_trace.z) == [8.0, 12.0, None]  # only La has both
    assert fig.layout.scene.aspectmode == "data"


def test_volume_figure_downsamples_to_max_size_and_keeps_mm() -> None:
    pytest.importorskip("plotly")
    fig = volume_figure_3d(_ball(shape=(48, 40, 32), centre=(24.0, 20.0, 16.0), radius=10.0), levels=(500.0,),
                           level_names=("bone",), level_colors=("#ffffff",), opacities=(1.0,), max_size=16,
                           method="isosurface", spacing=(1.0, 1.0, 2.0))  # fmt: skip
    iso = fig.data[0]
    x, z = np.asarray(iso.x), np.asarray(iso.z)
    assert np.asarray(iso.value).size == 16 * 14 * 11  # 48/3, ceil(40/3), ceil(32/3) blocks of 3
    assert x.min() == pytest.approx(1.0) and z.min() == pytest.approx(2.0)  # block centres: voxel 1 of each block
    assert x.max() == pytest.approx(46.0)


def test_volume_figure_mesh_is_centred_on_the_ball() -> None:
    pytest.importorskip("plotly")
    pytest.importorskip("skimage")
    centre, spacing = np.array([12.0, 10.0, 14.0]), np.array([0.5, 0.8, 1.5])
    fig = volume_figure_3d(_ball(centre=tuple(centre)), spacing=spacing, levels=(500.0,), level_names=("bone",),
                           level_colors=("#ffffff",), opacities=(1.0,), method="mesh")  # fmt: skip
    mesh = fig.data[0]
    assert mesh.type == "mesh3d" and len(mesh.i) > 100
    vertices = np.stack([np.asarray(mesh.x), np.asarray(mesh.y), np.asarray(mesh.z)], axis=1)
    assert vertices.mean(axis=0) == pytest.approx(centre * spacing, abs=0.1)


def test_volume_figure_skips_levels_that_cross_nothing_and_checks_options(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("plotly")
    fig = volume_figure_3d(np.zeros((16, 16, 16)), truth=np.zeros((1, 3)), method="isosurface")
    assert [t.name for t in fig.data] == ["ground truth"]
    with pytest.raises(ValueError, match="one entry per surface"):
        volume_figure_3d(np.zeros((16, 16, 16)), levels=(1.0, 2.0), level_names=("a",))
    with pytest.raises(ValueError, match="method"):
        volume_figure_3d(np.zeros((16, 16, 16)), method="volume")
    with pytest.raises(ValueError, match="max_size"):
        volume_figure_3d(np.zeros((16, 16, 16)), max_size=4, method="isosurface")
    monkeypatch.setattr(viz, "_has_skimage", lambda: False)
    with pytest.raises(ValueError, match="scikit-image"):
        volume_figure_3d(np.zeros((16, 16, 16)), method="mesh")
    assert volume_figure_3d(_ball(), levels=(300.0,), level_names=("b",), level_colors=("#fff",),
                            opacities=(1.0,)).data[0].type == "isosurface"  # auto falls back  # fmt: skip


def test_setup_plotly_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    pio = pytest.importorskip("plotly.io")
    before = pio.renderers.default
    try:
        assert viz.setup_plotly("json") == "json" and pio.renderers.default == "json"
        monkeypatch.setenv("PLOTLY_RENDERER", "notebook_connected")
        assert viz.setup_plotly() == "notebook_connected"
        monkeypatch.delenv("PLOTLY_RENDERER")
        monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
        assert viz.setup_plotly() == "colab"
        monkeypatch.delitem(sys.modules, "google.colab")
        assert viz.setup_plotly() == "plotly_mimetype+notebook"
    finally:
        pio.renderers.default = before


# ---------------------------------------------------------------------------------------------------- widgets
def test_slice_browser_renders_and_follows_the_slider() -> None:
    pytest.importorskip("ipywidgets")
    volume = np.random.default_rng(3).normal(size=(20, 16, 12)).astype(np.float32)
    truth = np.array([[5.0, 5.0, 3.0]])
    browser = viz.slice_browser(volume, truth=truth, prediction=truth + 1, names=["La"], index=3, size_in=2.0)
    (plane, slider), image = browser.children[0].children, browser.children[1]
    assert (plane.value, slider.min, slider.max, slider.value) == (2, 0, 11, 3)
    first = bytes(image.value)
    assert first.startswith(PNG)
    slider.value = 9
    assert bytes(image.value).startswith(PNG) and bytes(image.value) != first
    plane.value = 0  # sagittal: the slider spans axis 0
    assert (slider.max, slider.value) == (19, 10)
    with pytest.raises(ValueError, match="axis"):
        viz.slice_browser(volume, axis=3)
    with pytest.raises(ValueError, match="outside"):
        viz.slice_browser(volume, index=12)


def test_view_itk_is_optional_and_passes_the_data(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "itkwidgets", None)  # not installed
    with pytest.raises(ImportError, match="pip install 'itkwidgets"):
        viz.view_itk(np.zeros((4, 5, 6)))

    calls = []
    fake = types.ModuleType("itkwidgets")
    fake.__version__ = "1.0a55"
    fake.view = lambda *args, **kwargs: calls.append((args, kwargs)) or "viewer"
    monkeypatch.setitem(sys.modules, "itkwidgets", fake)
    monkeypatch.setitem(sys.modules, "itk", None)  # no itk: numpy image, points in voxels
    truth = np.array([[1.0, 2.0, 3.0], [np.nan, np.nan, np.nan]])
    assert viz.view_itk(np.zeros((4, 5, 6)), truth=truth, prediction=truth + 1) == "viewer"
    _, kwargs = calls[-1]
    assert kwargs["image"].shape == (6, 5, 4)  # itk's (z, y, x)
    assert kwargs["point_set"].tolist() == [[1.0, 2.0, 3.0], [2.0, 3.0, 4.0]]

    fake.__version__ = "0.32.6"
    viz.view_itk(np.zeros((4, 5, 6)), truth=truth, prediction=truth + 1)
    args, kwargs = calls[-1]
    assert args[0].shape == (6, 5, 4) and len(kwargs["point_sets"]) == 2 and len(kwargs["point_set_colors"]) == 2
