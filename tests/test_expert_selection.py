"""Choosing experts: the lowest-scored, as many per layer, evenly per routing group; budgets refused clearly."""

import pytest

from layerprune.errors import LayerpruneError
from layerprune.importance.experts.registry import ExpertScores
from layerprune.selection.experts import experts_to_drop, lowest_experts


def test_counts_from_a_number_or_a_ratio():
    assert experts_to_drop(8, 2, num_experts=3) == 3
    assert experts_to_drop(8, 2, ratio=0.25) == 2
    assert experts_to_drop(128, 8, ratio=0.25, groups=8) == 32


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(num_experts=7), "at least 2 must stay"),
    (dict(ratio=0.01), "nothing to remove"),
    (dict(num_experts=3, groups=2), "multiple of 2"),
    (dict(), "exactly one"),
    (dict(num_experts=1, ratio=0.5), "exactly one"),
    (dict(ratio=1.0), "between 0 and 1"),
])
def test_bad_budgets_are_refused(kwargs, message):
    with pytest.raises(LayerpruneError, match=message):
        experts_to_drop(8, 2, **kwargs)


def test_the_lowest_go_per_layer_and_per_group():
    scores = ExpertScores("m", layers=[0, 3], experts=[[0, 1, 2, 3, 4, 5], [0, 2, 3, 4, 5, 7]],
                          values=[[5, 1, 4, 3, 0, 2], [1, 1, 9, 8, 7, 0]])
    assert lowest_experts(scores, 2) == {0: [1, 4], 3: [2, 7]}  # tie 1 = 1: the later expert goes
    # two groups of 3: one from each
    assert lowest_experts(scores, 2, groups=2) == {0: [1, 4], 3: [2, 7]}
    assert lowest_experts(scores, 4, groups=2) == {0: [1, 2, 4, 5], 3: [0, 2, 5, 7]}
