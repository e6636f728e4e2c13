from __future__ import annotations

import json
from pathlib import Path

import pytest

from cluster.model_info import ModelInfo
from cluster.stage_cut import even_split
from coordinator.speculation.cost_model import (
    HardwareProfile,
    Hop,
    Node,
    baseline,
    best_projection,
    conditional_to_cumulative,
    expected_tokens,
    get_profile,
    project,
    project_ahead,
    stage_read_bytes,
    step_ms,
)

TWO_4070 = get_profile("2x4070")


def test_baseline_of_2x4070_is_near_the_bandwidth_ceiling() -> None:
    # docs/architecture.md, "Numbers": 17.9 GB per token at 504 GB/s per card → 28 tok/s
    # from bandwidth alone;
    # hops and compute take a little off; ≈25 at 16k context with a q8_0 cache.
    short, long = baseline(TWO_4070).tok_s, baseline(TWO_4070, context=16384).tok_s
    assert 24 < short < 28.2
    assert 21 < long < short


def test_speculation_on_2x4070_roughly_doubles_throughput() -> None:
    # docs/architecture.md, "Numbers": α 0.7, γ 5 → about 2× (≈55 tok/s with a draft costing 8%).
    result = project(TWO_4070, conditional_to_cumulative([0.7] * 5), 5)
    assert result.expected_tokens == pytest.approx((1 - 0.7**6) / 0.3)
    assert 1.6 < result.speedup < 2.3
    assert 40 < result.tok_s < 60


def test_verifying_more_tokens_costs_little_on_gpus() -> None:
    one, six = step_ms(TWO_4070, 1), step_ms(TWO_4070, 6)
    assert 1.0 < six / one < 1.35


def test_hidden_states_cross_a_gigabit_link_at_82_us_per_token() -> None:
    lan = HardwareProfile("lan", (), (Hop("h", 0.0, 1.0, True),), 5120 * 2, 0.0)
    assert step_ms(lan, 10) == pytest.approx(10 * 5120 * 2 * 8 / 1e9 * 1000)


def test_a_node_costs_its_bytes_over_its_bandwidth() -> None:
    node = Node("n", bandwidth_gbs=100.0, weight_bytes=1e9, kv_bytes_per_token=1e5,
                compute_ms_per_token=0.5)
    single = HardwareProfile("one", (node,), (), 0, 0.0)
    assert step_ms(single, 2, context=1000) == pytest.approx(10 + 1 + 2 * 0.5)


def test_expected_tokens_extrapolates_past_measured_positions() -> None:
    measured = [0.8, 0.64]  # conditional 0.8 at both positions
    assert expected_tokens(measured, 2) == pytest.approx(2.44)
    assert expected_tokens(measured, 4) == pytest.approx(1 + 0.8 + 0.64 + 0.512 + 0.4096)
    assert expected_tokens([0.5], 3) == pytest.approx(1 + 0.5 + 0.25 + 0.125)


def test_a_slow_draft_makes_no_draft_the_best_choice() -> None:
    slow = HardwareProfile("cpu-like", TWO_4070.nodes, TWO_4070.hops,
                           TWO_4070.hidden_bytes_per_token, draft_ms_per_token=30.0)
    assert best_projection(slow, [0.5, 0.25, 0.1]).gamma == 0
    assert best_projection(TWO_4070, conditional_to_cumulative([0.9] * 16)).gamma >= 4


def test_projections_are_json_serialisable() -> None:
    result = best_projection(TWO_4070, [0.7, 0.5, 0.3])
    decoded = json.loads(json.dumps(result.as_dict()))
    assert decoded["profile"] == "2x4070" and decoded["gamma"] == result.gamma


def test_stage_read_bytes_puts_the_lm_head_on_the_last_stage() -> None:
    info = ModelInfo(path=Path("m.gguf"), arch="qwen2", name="m", n_layer=4, n_embd=8,
                     n_head=2, n_head_kv=1, head_dim=4, n_vocab=10, n_ctx_train=64,
                     layer_bytes=(10, 20, 30, 40), token_embd_bytes=500, output_bytes=0,
                     other_bytes=1)
    assert stage_read_bytes(info, even_split(4, 2)) == [31.0, 71.0 + 500]


def test_unknown_profile_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="2x4070"):
        get_profile("8xH100")


def test_run_ahead_on_2x4070_keeps_both_cards_busy() -> None:
    """A projection: windows accepted whole follow each other a stage apart, a rejection
    costs a ring-time; so with good acceptance run-ahead beats synchronous speculation
    by up to the number of nodes, and with none it is no faster."""
    good = conditional_to_cumulative([0.9] * 8)
    sync, ahead = project(TWO_4070, good, 4), project_ahead(TWO_4070, good, 4)
    assert ahead.depth == 2 and ahead.expected_tokens == sync.expected_tokens
    assert 1.1 < ahead.tok_s / sync.tok_s < 2.0
    never = conditional_to_cumulative([0.0] * 8)
    assert project_ahead(TWO_4070, never, 0).tok_s <= baseline(TWO_4070).tok_s
