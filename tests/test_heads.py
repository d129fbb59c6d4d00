"""AnchorHead: output contract, anchor order shared with AnchorGrid, initialisation, gradients."""

from __future__ import annotations

import math

import pytest
import torch

from h3de_lite.anchors import AnchorGrid
from h3de_lite.models.heads import AnchorHead


@pytest.mark.parametrize(
    "kwargs, input_shape, offsets_shape, logits_shape",
    [
        [dict(in_channels=8, num_landmarks=14), (2, 8, 4, 4, 2), (2, 32, 14, 3), (2, 32, 14)],
        [dict(in_channels=8, num_landmarks=14, num_anchors=3), (1, 8, 4, 4, 2), (1, 96, 14, 3), (1, 96, 14)],
        [
            dict(in_channels=6, num_landmarks=2, num_anchors=3, hidden_channels=5),
            (1, 6, 2, 3, 1),
            (1, 18, 2, 3),
            (1, 18, 2),
        ],
    ],
)
def test_output_shapes(kwargs, input_shape, offsets_shape, logits_shape):
    out = AnchorHead(**kwargs)(torch.randn(input_shape))
    assert out["offsets"].shape == offsets_shape
    assert out["logits"].shape == logits_shape


@pytest.mark.parametrize("config", ["single", "multi"])
def test_anchor_order_matches_grid(config):
    """Anchor a of the head output comes from feature location/anchor (d, h, w, n) = unflatten(a), as in the grid."""
    grid = AnchorGrid((16, 12, 8), config=config)
    n_a = grid.num_anchors_per_location
    head = AnchorHead(in_channels=3, num_landmarks=2, num_anchors=n_a)
    # Replace both branches by maps whose channel c at location (d, h, w) encodes (d, h, w, c).
    d, h, w = grid.feature_shape

    class Probe(torch.nn.Module):
        def __init__(self, channels: int) -> None:
            super().__init__()
            self.channels = channels

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            dd, hh, ww = torch.meshgrid(torch.arange(d), torch.arange(h), torch.arange(w), indexing="ij")
            loc = ((dd * h + hh) * w + ww).float()  # flat location index
            return torch.stack([loc * 1000 + c for c in range(self.channels)])[None].expand(x.shape[0], -1, -1, -1, -1)

    head.offset_branch = Probe(3 * 2 * n_a)
    head.logit_branch = Probe(2 * n_a)
    out = head(torch.zeros(1, 3, d, h, w))
    for a in [0, 1, grid.num_anchors // 2 + 1, grid.num_anchors - 1]:
        loc, n = divmod(a, n_a)
        assert a == grid.anchor_index(((loc // w) // h, (loc // w) % h, loc % w), anchor=n)
        # logits channel layout (n, l): channel = n * L + l
        for l in range(2):
            assert out["logits"][0, a, l].item() == loc * 1000 + n * 2 + l
            for c in range(3):  # offsets channel layout (n, l, c)
                assert out["offsets"][0, a, l, c].item() == loc * 1000 + (n * 2 + l) * 3 + c


def test_prior_initialisation():
    torch.manual_seed(0)
    head = AnchorHead(in_channels=8, num_landmarks=4, num_anchors=3)
    out = head(torch.randn(2, 8, 4, 4, 4))
    p = torch.sigmoid(out["logits"])
    # Last-layer weights of std 0.01 perturb the logits by ~0.01 around log(0.01 / 0.99): p stays within 10 % of 0.01.
    assert ((p > 0.009) & (p < 0.011)).all()
    assert abs(p.mean().item() - 0.01) < 1e-4
    assert out["offsets"].abs().mean() < 0.03  # ~0.01 · √hidden · |activation|
    assert head.logit_branch[-1].bias[0].item() == pytest.approx(math.log(0.01 / 0.99))


def test_every_parameter_gets_a_gradient():
    head = AnchorHead(in_channels=8, num_landmarks=3, num_anchors=3)
    out = head(torch.randn(2, 8, 2, 2, 2))
    (out["offsets"].square().sum() + out["logits"].sum()).backward()
    for name, p in head.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    assert torch.isfinite(out["offsets"]).all() and torch.isfinite(out["logits"]).all()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(in_channels=0, num_landmarks=14), "in_channels must be a positive integer, got 0"),
        (dict(in_channels=8, num_landmarks=0), "num_landmarks must be a positive integer, got 0"),
        (dict(in_channels=8, num_landmarks=14, num_anchors=0), "num_anchors must be a positive integer, got 0"),
        (dict(in_channels=8, num_landmarks=14, hidden_channels=0), "hidden_channels must be a positive integer"),
        (dict(in_channels=8, num_landmarks=14, prior_probability=1.0), "prior_probability must lie strictly between"),
    ],
)
def test_bad_constructor_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AnchorHead(**kwargs)


def test_bad_input_raises():
    head = AnchorHead(in_channels=8, num_landmarks=2)
    with pytest.raises(ValueError, match=r"AnchorHead expects input of shape \(B, 8, d, h, w\), got \(1, 4, 2, 2, 2\)"):
        head(torch.randn(1, 4, 2, 2, 2))
    with pytest.raises(ValueError, match=r"AnchorHead expects input of shape \(B, 8, d, h, w\), got \(8, 2, 2, 2\)"):
        head(torch.randn(8, 2, 2, 2))
