"""Projected tokens/s on hardware we do not have, from acceptance measured where we are.

At batch sizes this small (γ+1 ≤ 17 tokens) a GPU's decode step is bound by memory
bandwidth: each node reads its weights once per step whatever the batch, so

    t_step(γ) = Σ_nodes (weight_bytes + kv_bytes) / bandwidth + (γ+1)·compute_per_token
                + Σ_hops (latency + bytes_sent / link_bandwidth)

and with acceptance measured per draft position (`Stats.as_dict()["acceptance_by_position"]`:
entry k is the fraction of steps with a (k+1)-th guess in which guesses 1..k+1 were all
accepted), E[tokens](γ) = 1 + Σ_{k<γ} acceptance[k], tokens/s = E / (γ·t_draft + t_step).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from cluster.model_info import KvType, ModelInfo
from cluster.stage_cut import StageSpec

GB = 1e9


@dataclass(frozen=True)
class Node:
    name: str
    bandwidth_gbs: float  # memory bandwidth, GB/s
    weight_bytes: float  # weights read per step
    kv_bytes_per_token: float = 0.0  # KV read per step per token of context
    compute_ms_per_token: float = 0.0  # the part of a step that grows with the batch


@dataclass(frozen=True)
class Hop:
    name: str
    latency_ms: float  # one way
    link_gbits: float  # link bandwidth, Gbit/s
    carries_hidden: bool  # hidden states (n_tokens × n_embd) or just a few token ids


@dataclass(frozen=True)
class HardwareProfile:
    name: str
    nodes: tuple[Node, ...]
    hops: tuple[Hop, ...]
    hidden_bytes_per_token: float  # n_embd × bytes per value on the wire
    draft_ms_per_token: float


@dataclass(frozen=True)
class Projection:
    profile: str
    gamma: int
    context: int
    expected_tokens: float  # per step
    step_ms: float  # one pipeline pass of γ+1 tokens
    draft_ms: float  # γ draft tokens
    tok_s: float
    speedup: float  # over the same hardware without a draft
    depth: int = 1  # windows in flight (run-ahead when > 1)

    def as_dict(self) -> dict[str, object]:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(self).items()}


def node_ms(node: Node, n_tokens: int, context: int) -> float:
    read = node.weight_bytes + node.kv_bytes_per_token * context
    return 1000 * read / (node.bandwidth_gbs * GB) + n_tokens * node.compute_ms_per_token


def hop_ms(hop: Hop, n_tokens: int, hidden_bytes_per_token: float) -> float:
    sent = n_tokens * hidden_bytes_per_token if hop.carries_hidden else 0.0
    return hop.latency_ms + 1000 * 8 * sent / (hop.link_gbits * GB)


def step_ms(profile: HardwareProfile, n_tokens: int, context: int = 0) -> float:
    """One pass of n_tokens through every node and every hop, one after the other."""
    return sum(node_ms(n, n_tokens, context) for n in profile.nodes) + \
        sum(hop_ms(h, n_tokens, profile.hidden_bytes_per_token) for h in profile.hops)


def cumulative(acceptance: list[float], n: int) -> list[float]:
    """P(first k+1 guesses accepted) for k < n; positions past the data extrapolated.

    Past the measured positions each further guess is assumed accepted with the last
    measured conditional rate acceptance[-1] / acceptance[-2].
    """
    out = list(acceptance[:n])
    if len(out) < n and out:
        prev = acceptance[-2] if len(acceptance) > 1 else 1.0
        rate = min(acceptance[-1] / prev, 1.0) if prev > 0 else 0.0
        while len(out) < n:
            out.append(out[-1] * rate)
    return out


def expected_tokens(acceptance: list[float], gamma: int) -> float:
    """1 + Σ_{k<γ} P(first k+1 guesses accepted)."""
    return 1.0 + sum(cumulative(acceptance, gamma))


def baseline(profile: HardwareProfile, context: int = 0) -> Projection:
    """No draft: one token per pass."""
    ms = step_ms(profile, 1, context)
    return Projection(profile.name, 0, context, 1.0, ms, 0.0, 1000 / ms, 1.0)


def project(profile: HardwareProfile, acceptance: list[float], gamma: int,
            context: int = 0) -> Projection:
    """Tokens/s with γ guesses a step, given acceptance measured per position."""
    if gamma == 0:
        return baseline(profile, context)
    tokens = expected_tokens(acceptance, gamma) if acceptance else 1.0
    ms = step_ms(profile, gamma + 1, context)
    draft = gamma * profile.draft_ms_per_token
    tok_s = 1000 * tokens / (draft + ms)
    return Projection(profile.name, gamma, context, tokens, ms, draft, tok_s,
                      tok_s / baseline(profile, context).tok_s)


def project_ahead(profile: HardwareProfile, acceptance: list[float], gamma: int,
                  context: int = 0) -> Projection:
    """Tokens/s with run-ahead windows, one per node in flight (docs/scheduler.md,
    "Run-ahead windows"): a window of γ guesses and a link is accepted whole with
    P = P(first γ+1 accepted); then the next verdict follows a stage-time later (the
    slowest node and its hop; the draft runs on the first node's GPU, beside its
    stage), else a whole ring-time later, the fresh window drafted after the verdict."""
    n = gamma + 1
    stages = [node_ms(node, n, context) + hop_ms(hop, n, profile.hidden_bytes_per_token)
              for node, hop in zip(profile.nodes, profile.hops, strict=True)]
    draft = n * profile.draft_ms_per_token
    whole = cumulative(acceptance, n)[-1] if acceptance else 0.0
    first = [stages[0] + draft, *stages[1:]]
    ms = whole * max(first) + (1 - whole) * (sum(stages) + draft)
    tokens = expected_tokens(acceptance, gamma) if acceptance else 1.0
    tok_s = 1000 * tokens / ms
    return Projection(profile.name, gamma, context, tokens, sum(stages), draft, tok_s,
                      tok_s / baseline(profile, context).tok_s, depth=len(stages))


def best_projection(profile: HardwareProfile, acceptance: list[float], gamma_max: int = 16,
                    context: int = 0) -> Projection:
    """The γ in 0..gamma_max with the highest projected tokens/s."""
    options = [project(profile, acceptance, g, context) for g in range(gamma_max + 1)]
    return max(options, key=lambda p: p.tok_s)


def conditional_to_cumulative(alphas: list[float]) -> list[float]:
    """α_k = P(accept k | 1..k−1 accepted) → P(1..k all accepted), the form used here."""
    out, run = [], 1.0
    for a in alphas:
        run *= a
        out.append(run)
    return out


def stage_read_bytes(info: ModelInfo, specs: list[StageSpec]) -> list[float]:
    """Weights each stage reads per step: its layers, plus the lm_head on the last.

    The first stage looks up a few rows of token_embd, which costs nothing worth counting.
    """
    return [float(sum(info.layer_bytes[s.begin:s.end]) + info.other_bytes
                  + (info.lm_head_bytes if s.is_last else 0)) for s in specs]


# QwQ-32B: 64 layers, 8 KV heads × 128, n_embd 5120; Q4_K_H 17.9e9 bytes
# (docs/architecture.md, "Numbers"). RTX 4070: 504 GB/s. KV q8_0 on all layers:
# 64 · 2·8·128 · 34/32 B.
QWQ_BYTES = 17.9e9
QWQ_KV_Q8_PER_TOKEN = 64 * 2 * 8 * 128 * KvType.Q8_0.bytes_per_value
# Estimate, not measured: 16 GFLOP/token (half of 2·32e9 per node) at ~18 TFLOP/s that
# llama.cpp's quantized small-batch kernels reach on a 4070 ≈ 0.9 ms.
RTX4070_COMPUTE_MS_PER_TOKEN = 0.9
# Estimate, not measured: Qwen3-0.6B on a 4070 with llama.cpp decodes ≈ 400 tok/s
# (kernel launches, not bandwidth, bound a model this small). Measure when a GPU is at hand.
QWEN3_06B_MS_PER_TOKEN = 2.5

PROFILES: dict[str, HardwareProfile] = {
    "2x4070": HardwareProfile(
        name="2x4070",
        nodes=tuple(Node(f"rtx4070-{i}", 504.0, QWQ_BYTES / 2, QWQ_KV_Q8_PER_TOKEN / 2,
                         RTX4070_COMPUTE_MS_PER_TOKEN) for i in range(2)),
        # The coordinator shares box 0 with worker 0: its hop is local. 1 GbE between boxes.
        hops=(Hop("worker0→worker1", 0.5, 1.0, True),
              Hop("worker1→coordinator", 0.5, 1.0, False)),
        hidden_bytes_per_token=5120 * 2,  # f16 on the wire
        draft_ms_per_token=QWEN3_06B_MS_PER_TOKEN,
    ),
}


def get_profile(name: str) -> HardwareProfile:
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown hardware profile {name!r}; known: "
                         f"{', '.join(sorted(PROFILES))}") from None
