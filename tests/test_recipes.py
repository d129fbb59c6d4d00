"""Training recipes: which defaults a preset's run gets."""

from __future__ import annotations

import pytest

from h3de_lite.training import TrainConfig, recipe_for


def test_recipes_by_preset() -> None:
    tiny, paper = recipe_for("tiny"), recipe_for("paper-incomplete")
    assert (tiny.name, tiny.spacing, tiny.train["heatmap_loss"]) == ("tiny", 1.5, "softmax_ce")
    assert (paper.name, paper.spacing, paper.crop, paper.train) == ("paper", None, None, {})
    assert TrainConfig().replace(**paper.train).heatmap_loss == "mse"  # the paper's eq. 13
    TrainConfig().replace(**tiny.train)  # every field of the recipe is a valid TrainConfig field


def test_unknown_preset() -> None:
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        recipe_for("huge")
