from __future__ import annotations

import numpy as np
import pytest

from cluster.sampling import SamplingParams
from coordinator.speculation.drafting import DraftRequest
from coordinator.speculation.ngram import NgramConfig, NgramDrafter, find_match, lookup

CONFIG = NgramConfig(n_max=3, n_min=1)


def test_proposes_what_followed_the_last_occurrence_of_the_suffix() -> None:
    context = [1, 2, 3, 4, 5, 9, 9, 1, 2, 3]
    assert lookup(context, 2, CONFIG) == [4, 5]


def test_prefers_the_most_recent_occurrence() -> None:
    context = [7, 8, 1, 7, 8, 2, 0, 7, 8]
    assert lookup(context, 1, CONFIG) == [2]


def test_prefers_longer_ngrams_over_more_recent_short_ones() -> None:
    # "5 6" occurred long ago followed by 1; "6" alone occurred recently followed by 3.
    context = [5, 6, 1, 0, 6, 3, 0, 5, 6]
    assert lookup(context, 1, CONFIG) == [1]
    assert lookup(context, 1, NgramConfig(n_max=1, n_min=1)) == [3]


def test_no_match_proposes_nothing() -> None:
    assert lookup([1, 2, 3, 4], 4, CONFIG) == []
    assert lookup([], 4, CONFIG) == []
    assert lookup([1], 4, CONFIG) == []
    assert lookup([1, 2, 1], 0, CONFIG) == []


def test_min_n_limits_how_short_a_match_may_be() -> None:
    assert lookup([4, 1, 2, 9, 2], 1, NgramConfig(n_max=3, n_min=2)) == []
    assert lookup([4, 1, 2, 9, 2], 1, NgramConfig(n_max=3, n_min=1)) == [9]


def test_a_continuation_past_the_end_repeats_the_period() -> None:
    context = [0, 1, 2, 3, 1, 2, 3]  # period 3 after the first token
    assert lookup(context, 7, CONFIG) == [1, 2, 3, 1, 2, 3, 1]
    assert lookup([5, 5, 5], 4, CONFIG) == [5, 5, 5, 5]


def test_find_match_never_matches_the_suffix_itself() -> None:
    assert find_match(np.array([1, 2, 3]), 3) is None
    assert find_match(np.array([1, 2, 3]), 1) is None
    assert find_match(np.array([3, 1, 2, 3]), 1) == 0


def test_drafter_gives_point_masses_and_follows_gamma() -> None:
    drafter = NgramDrafter(CONFIG)
    context = [10, 11, 12, 13, 14, 10, 11]
    (draft,) = drafter.propose([DraftRequest(0, context, 3, SamplingParams(temperature=0.8),
                                             np.random.default_rng(0))])
    assert draft.tokens == [12, 13, 14]
    assert [d.ids.tolist() for d in draft.dists] == [[12], [13], [14]]
    assert all(d.probs.tolist() == [1.0] for d in draft.dists)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_a_repeated_text_is_drafted_exactly(n: int) -> None:
    text = list(range(100, 140))
    context = text + text[:10]
    assert lookup(context, 8, NgramConfig(n_max=n, n_min=n)) == text[10:18]
