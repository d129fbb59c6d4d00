"""Losses (eq. 13–17): zero at the targets, hand-computed values, imbalance handling, bad input."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from h3de_lite.anchors import AnchorGrid
from h3de_lite.heatmaps import gaussian_heatmaps
from h3de_lite.losses import (
    anchor_based_loss,
    anchor_free_loss,
    existence_loss,
    heatmap_loss,
    landmark_existence_loss,
    offset_loss,
)

NAN = float("nan")
HM = torch.zeros(1, 2, 2, 2, 2)
FLOOR = math.log1p(math.exp(-20.0))  # BCE of a logit of ±20 that agrees with its label, ≈ 2.1e-9


@pytest.fixture
def batch():
    grid = AnchorGrid((16, 16, 8), config="multi")
    g = torch.tensor(
        [[[3.0, 4.0, 5.0], [12.2, 0.0, 7.5], [NAN, NAN, NAN]], [[8.0, 8.0, 4.0], [NAN] * 3, [1.0, 14.9, 0.3]]]
    )
    targets = grid.encode(g)
    hm = gaussian_heatmaps(g, (16, 16, 8), sigma=2.0)
    present = ~torch.isnan(g).any(-1)
    return grid, g, targets, hm, present


def test_all_terms_zero_at_targets(batch):
    _, _, targets, hm, present = batch
    outputs = {
        "offsets": targets["offsets"].clone(),
        "logits": torch.where(targets["positive"], 20.0, -20.0),
        "heatmaps": hm.clone(),
    }
    losses = anchor_based_loss(outputs, targets, target_heatmaps=hm, present=present)
    assert set(losses) == {"offset", "existence", "heatmap", "total"}
    assert losses["offset"].item() == 0.0
    assert losses["heatmap"].item() == 0.0
    assert 0.0 <= losses["existence"].item() <= 2 * FLOOR + 1e-12  # mean over positives + mean over negatives
    assert losses["total"].item() < 1e-8
    free = anchor_free_loss(hm, hm)
    assert free["heatmap"].item() == 0.0 and free["total"].item() == 0.0


def test_heatmap_loss_values():
    pred = torch.zeros(1, 2, 2, 2, 2)
    target = torch.zeros(1, 2, 2, 2, 2)
    target[0, 0] = 1.0  # channel 0 wrong everywhere by 1, channel 1 right
    assert heatmap_loss(pred, target).item() == pytest.approx(0.5)
    assert heatmap_loss(pred, target, present=torch.tensor([[True, False]])).item() == pytest.approx(1.0)
    assert heatmap_loss(pred, target, present=torch.tensor([[False, True]])).item() == 0.0
    assert torch.equal(F.mse_loss(pred, target), heatmap_loss(pred, target))
    p = pred.clone().requires_grad_()
    heatmap_loss(p, target, present=torch.tensor([[False, False]])).backward()  # empty mask: zero with a graph
    assert torch.all(p.grad == 0)


def test_offset_loss_is_squared_l2_over_positives():
    target = torch.zeros(1, 4, 1, 3)
    pred = torch.zeros(1, 4, 1, 3)
    pred[0, 0, 0] = torch.tensor([1.0, 2.0, 2.0])  # ‖·‖² = 9
    pred[0, 1, 0] = torch.tensor([0.0, 0.0, 1.0])  # ‖·‖² = 1
    pred[0, 2, 0] = 100.0  # negative anchor: ignored
    positive = torch.tensor([[[True], [True], [False], [False]]])
    assert offset_loss(pred, target, positive).item() == pytest.approx(5.0)
    p = pred.clone().requires_grad_()
    loss = offset_loss(p, target, torch.zeros_like(positive))
    assert loss.item() == 0.0
    loss.backward()


def test_existence_loss_balance():
    y = torch.zeros(1, 1000, 1)
    y[0, 0, 0] = 1.0
    logits = torch.zeros_like(y)  # p = 0.5 everywhere: BCE = log 2 for each anchor
    assert existence_loss(logits, y).item() == pytest.approx(2 * math.log(2))  # log 2 + log 2
    assert existence_loss(logits, y, balance="mean").item() == pytest.approx(math.log(2))
    # Positives and negatives weigh the same whatever their counts.
    logits = torch.where(y > 0, -2.0, -20.0)  # positive badly predicted, negatives perfect
    balanced = existence_loss(logits, y).item()
    plain = existence_loss(logits, y, balance="mean").item()
    assert balanced == pytest.approx(F.softplus(torch.tensor(2.0)).item() + FLOOR, rel=1e-6)
    assert plain < balanced / 100
    weighted = existence_loss(logits, y, balance="mean", pos_weight=999.0).item()
    assert weighted == pytest.approx((999 * F.softplus(torch.tensor(2.0)).item() + 999 * FLOOR) / 1000, rel=1e-6)
    # Only negatives (all landmarks missing): still trains the negatives.
    zero_y = torch.zeros(1, 10, 2)
    assert existence_loss(torch.zeros_like(zero_y), zero_y).item() == pytest.approx(math.log(2))


def test_hard_negative_mining():
    y = torch.zeros(1, 100, 1)
    y[0, 0, 0] = 1.0
    logits = torch.full_like(y, -20.0)
    logits[0, 0, 0] = 20.0
    logits[0, 1:4, 0] = torch.tensor([3.0, 2.0, 1.0])  # the three hardest negatives
    mined = existence_loss(logits, y, hard_negative_ratio=3).item()
    expected = FLOOR + F.softplus(torch.tensor([3.0, 2.0, 1.0])).mean().item()
    assert mined == pytest.approx(expected, rel=1e-6)
    assert existence_loss(logits, y).item() < mined  # the plain negative mean dilutes the hard ones


def test_landmark_existence_scores_each_landmarks_best_anchor():
    # Two crops, three landmarks, four anchors. Crop 0: landmark 0 has a positive anchor (in the crop), landmarks
    # 1 and 2 have none (missing or outside). Crop 1: landmark 2 is in the crop. One BCE per (crop, landmark) on the
    # highest logit, by hand: softplus(-z) for label 1, softplus(z) for label 0.
    logits = torch.tensor(
        [
            [[2.0, -1.0, -4.0], [0.5, 3.0, -2.0], [-1.0, -6.0, -3.0], [1.0, 0.0, -5.0]],
            [[-2.0, -3.0, 0.5], [-1.0, -2.0, -1.0], [-4.0, 1.5, 2.5], [0.0, -1.0, 4.0]],
        ],
        dtype=torch.float64,
        requires_grad=True,
    )  # (B=2, A=4, L=3)
    positive = torch.zeros(2, 4, 3, dtype=torch.bool)
    positive[0, 2, 0] = True  # not the best anchor of landmark 0: the label is per landmark, the logit its maximum
    positive[1, 3, 2] = True
    best = [[2.0, 3.0, -2.0], [0.0, 1.5, 4.0]]
    labels = [[1, 0, 0], [0, 0, 1]]
    softplus = lambda z: math.log1p(math.exp(z))  # noqa: E731
    pairs = [(z, y) for zs, ys in zip(best, labels, strict=True) for z, y in zip(zs, ys, strict=True)]
    terms = [softplus(-z) if y else softplus(z) for z, y in pairs]
    loss = landmark_existence_loss(logits, positive)
    assert loss.item() == pytest.approx(sum(terms) / 6, rel=1e-12)
    loss.backward()
    reached = logits.grad != 0
    assert reached.sum().item() == 6 and reached.any(dim=1).all()  # only each landmark's best anchor
    with pytest.raises(ValueError, match="landmark_existence_loss"):
        landmark_existence_loss(logits, positive[:, :3])


def test_anchor_based_loss_adds_the_landmark_term_only_when_weighted(batch):
    grid, _, targets, hm, _ = batch
    outputs = {"offsets": targets["offsets"].clone(), "logits": torch.zeros_like(targets["probabilities"])}
    plain = anchor_based_loss(outputs, targets, lambda_heatmap=0.0)
    assert "landmark" not in plain
    weighted = anchor_based_loss(outputs, targets, lambda_heatmap=0.0, lambda_landmark=0.5)
    assert weighted["landmark"].item() == pytest.approx(math.log(2))  # every best logit is 0
    assert weighted["total"].item() == pytest.approx(plain["total"].item() + 0.5 * math.log(2), rel=1e-6)


def test_anchor_based_weights_and_terms(batch):
    grid, _, targets, hm, _ = batch
    torch.manual_seed(0)
    outputs = {
        "offsets": torch.randn_like(targets["offsets"]),
        "logits": torch.randn_like(targets["probabilities"]),
        "heatmaps": torch.rand_like(hm),
    }
    base = anchor_based_loss(outputs, targets, target_heatmaps=hm)
    weighted = anchor_based_loss(
        outputs, targets, target_heatmaps=hm, lambda_reg=2.0, lambda_cls=0.5, lambda_heatmap=3.0
    )
    expected = 2.0 * base["offset"] + 0.5 * base["existence"] + 3.0 * base["heatmap"]
    assert weighted["total"].item() == pytest.approx(expected.item(), rel=1e-6)
    unweighted = base["offset"] + base["existence"] + base["heatmap"]
    assert base["total"].item() == pytest.approx(unweighted.item(), rel=1e-6)
    head_only = {k: outputs[k] for k in ("offsets", "logits")}
    assert anchor_based_loss(head_only, targets)["heatmap"].item() == 0.0
    assert anchor_based_loss(outputs, targets, lambda_heatmap=0.0)["total"].item() == pytest.approx(
        (base["offset"] + base["existence"]).item(), rel=1e-6
    )


def test_gradients_flow(batch):
    _, _, targets, hm, _ = batch
    outputs = {
        "offsets": torch.zeros_like(targets["offsets"]).requires_grad_(),
        "logits": torch.zeros_like(targets["probabilities"]).requires_grad_(),
        "heatmaps": torch.zeros_like(hm).requires_grad_(),
    }
    anchor_based_loss(outputs, targets, target_heatmaps=hm)["total"].backward()
    for name, tensor in outputs.items():
        assert tensor.grad is not None and tensor.grad.abs().sum() > 0, name


_TARGETS_WITHOUT_POSITIVE = {"offsets": torch.zeros(1, 4, 1, 3), "probabilities": torch.zeros(1, 4, 1)}
_TARGETS = {**_TARGETS_WITHOUT_POSITIVE, "positive": torch.zeros(1, 4, 1, dtype=torch.bool)}
_HEAD = {"offsets": torch.zeros(1, 4, 1, 3), "logits": torch.zeros(1, 4, 1)}


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (
            lambda: heatmap_loss(torch.zeros(1, 2, 2, 2, 2), torch.zeros(1, 3, 2, 2, 2)),
            r"heatmap_loss: prediction shape \(1, 2, 2, 2, 2\) differs from target shape \(1, 3, 2, 2, 2\)",
        ),
        (
            lambda: heatmap_loss(torch.zeros(1, 2, 2, 2), torch.zeros(1, 2, 2, 2)),
            r"heatmap_loss expects \(B, L, D, H, W\) heatmaps",
        ),
        (
            lambda: heatmap_loss(HM, HM, present=torch.ones(2, dtype=torch.bool)),
            r"present must have shape \(1, 2\), got \(2,\)",
        ),
        (
            lambda: offset_loss(
                torch.zeros(1, 4, 1, 3), torch.zeros(1, 4, 1, 3), torch.zeros(1, 4, 2, dtype=torch.bool)
            ),
            r"offset_loss expects offsets \(B, A, L, 3\) and positive \(B, A, L\)",
        ),
        (
            lambda: offset_loss(
                torch.zeros(1, 4, 1, 2), torch.zeros(1, 4, 1, 2), torch.zeros(1, 4, 1, dtype=torch.bool)
            ),
            r"offset_loss expects offsets \(B, A, L, 3\)",
        ),
        (
            lambda: existence_loss(torch.zeros(1, 4, 1), torch.zeros(1, 4, 2)),
            "existence_loss: prediction shape .* differs from target shape",
        ),
        (
            lambda: existence_loss(torch.zeros(1, 4, 1), torch.zeros(1, 4, 1), balance="focal"),
            "balance must be 'mean_pos_neg' or 'mean', got 'focal'",
        ),
        (  # pos_weight needs balance="mean"
            lambda: existence_loss(torch.zeros(1, 4, 1), torch.zeros(1, 4, 1), pos_weight=10.0),
            "pos_weight must be a positive number and needs balance='mean'",
        ),
        (
            lambda: existence_loss(torch.zeros(1, 4, 1), torch.zeros(1, 4, 1), hard_negative_ratio=0),
            "hard_negative_ratio must be a positive number or None",
        ),
        (
            lambda: anchor_based_loss({"offsets": torch.zeros(1, 4, 1, 3)}, {}),
            "anchor_based_loss: outputs lacks 'logits'",
        ),
        (lambda: anchor_based_loss(_HEAD, _TARGETS_WITHOUT_POSITIVE), "anchor_based_loss: targets lacks 'positive'"),
        (  # heatmaps without target_heatmaps
            lambda: anchor_based_loss({**_HEAD, "heatmaps": HM[:, :1]}, _TARGETS),
            "outputs has 'heatmaps' but target_heatmaps is None",
        ),
    ],
)
def test_bad_input_raises_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ---------------------------------------------------------------- spatial-softmax cross-entropy (alternative to eq. 13)
def test_heatmap_softmax_ce_hand_computed():
    from h3de_lite.losses import heatmap_softmax_ce_loss

    # Channel 0: logits (0, ln 3) → softmax (1/4, 3/4); target (1, 1) → q = (1/2, 1/2).
    # CE = -(1/2 · ln 1/4 + 1/2 · ln 3/4) = (ln 4 + ln 4/3) / 2.
    # Channel 1: logits (0, 0) → (1/2, 1/2); target (0, 0.2) → q = (0, 1); CE = ln 2.
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, 0.0]]]).reshape(1, 2, 1, 1, 2)
    target = torch.tensor([[[1.0, 1.0], [0.0, 0.2]]]).reshape(1, 2, 1, 1, 2)
    ce0 = (math.log(4.0) + math.log(4.0 / 3.0)) / 2
    ce1 = math.log(2.0)
    assert heatmap_softmax_ce_loss(logits, target).item() == pytest.approx((ce0 + ce1) / 2, rel=1e-6)
    assert heatmap_softmax_ce_loss(logits, target, present=torch.tensor([[True, False]])).item() == pytest.approx(
        ce0, rel=1e-6
    )
    # A missing landmark (all-zero target) never counts, with or without a mask.
    target[0, 1] = 0.0
    assert heatmap_softmax_ce_loss(logits, target).item() == pytest.approx(ce0, rel=1e-6)
    # No channel counted: zero, still attached to the graph.
    z = logits.clone().requires_grad_()
    out = heatmap_softmax_ce_loss(z, target, present=torch.tensor([[False, False]]))
    out.backward()
    assert out.item() == 0.0 and torch.all(z.grad == 0)


def test_heatmap_softmax_ce_minimum_is_target_entropy():
    from h3de_lite.losses import heatmap_softmax_ce_loss

    # At logits = log q the cross-entropy equals the entropy of q, its minimum; the gradient vanishes there.
    target = gaussian_heatmaps(torch.tensor([[[3.3, 4.0, 2.0]]]), (8, 8, 6), sigma=1.5, dtype=torch.float64)
    q = target / target.sum()
    entropy = -(q * q.log()).sum().item()
    logits = (q.log() + 7.0).float().requires_grad_()  # any constant shift gives the same softmax
    loss = heatmap_softmax_ce_loss(logits, target)
    loss.backward()
    assert loss.item() == pytest.approx(entropy, rel=1e-5)
    assert logits.grad.abs().max().item() < 1e-6


def test_heatmap_softmax_ce_absent_class_hand_computed():
    from h3de_lite.losses import heatmap_softmax_ce_loss

    # Channel 0 present: logits (0, ln 3) plus the absent logit 0 → p = (1/5, 3/5, 1/5); q = (1/2, 1/2, 0):
    # CE = -(1/2 · ln 1/5 + 1/2 · ln 3/5). Channel 1 absent (zero target): logits (ln 2, ln 2) → p(absent) = 1/5,
    # CE = ln 5. Both count.
    logits = torch.tensor([[[0.0, math.log(3.0)], [math.log(2.0), math.log(2.0)]]]).reshape(1, 2, 1, 1, 2)
    target = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]]).reshape(1, 2, 1, 1, 2)
    ce0 = -(math.log(1 / 5) + math.log(3 / 5)) / 2
    ce1 = math.log(5.0)
    got = heatmap_softmax_ce_loss(logits, target, absent_class=True).item()
    assert got == pytest.approx((ce0 + ce1) / 2, rel=1e-6)
    # the mask decides what is absent: channel 0 declared absent is scored by -log p(absent) = ln 5 as well
    present = torch.tensor([[False, False]])
    assert heatmap_softmax_ce_loss(logits, target, present=present, absent_class=True).item() == pytest.approx(
        (math.log(5.0) + ce1) / 2, rel=1e-6
    )
    # very negative logits say "absent" with certainty: the loss of an absent channel goes to 0
    far = torch.full((1, 1, 2, 2, 2), -40.0)
    assert heatmap_softmax_ce_loss(far, torch.zeros_like(far), absent_class=True).item() == pytest.approx(0, abs=1e-12)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"logits": torch.zeros(1, 2, 2, 2, 2), "target": torch.zeros(1, 3, 2, 2, 2)}, "differs"),
        ({"logits": torch.zeros(1, 2, 2, 2), "target": torch.zeros(1, 2, 2, 2)}, r"\(B, L, D, H, W\)"),
        ({"logits": HM, "target": -torch.ones_like(HM)}, "non-negative"),
        ({"logits": HM, "target": HM, "present": torch.ones(2, dtype=torch.bool)}, "present must have shape"),
        ({"logits": HM, "target": HM, "present": torch.ones(1, 2, dtype=torch.bool)}, "all zero"),
    ],
)
def test_heatmap_softmax_ce_bad_input(kwargs, match):
    from h3de_lite.losses import heatmap_softmax_ce_loss

    with pytest.raises(ValueError, match=match):
        heatmap_softmax_ce_loss(**kwargs)
