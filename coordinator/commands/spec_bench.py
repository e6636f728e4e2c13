"""What speculation buys: fixed code prompts decoded greedily with and without a draft.

Per mode (no draft, n-gram, the draft model at fixed γ values and adaptive): tokens per
target step, acceptance by draft position, the mean γ, wall tokens/s, and whether the
output is the plain run's; then the projection of the measured acceptance onto a
hardware profile (`coordinator/speculation/cost_model.py`). Each prompt runs every mode in turn, so
drift on a shared machine hits all modes alike. Run by `bench/spec.py` and by
`specshard bench spec`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from cluster import models
from cluster.errors import SpecshardError
from cluster.model_info import inspect_model
from cluster.sampling import SamplingParams
from cluster.stage_cut import even_split
from coordinator.engine.frontend import Generation
from coordinator.engine.request import GenerationRequest
from coordinator.placement.local import LocalWorkers
from coordinator.ring.builder import BuiltRing, build_ring
from coordinator.service import EngineOptions, gamma_config, start_engine
from coordinator.speculation.cost_model import (
    Projection,
    baseline,
    best_projection,
    get_profile,
    project,
    project_ahead,
)
from coordinator.speculation.draft import DraftConfig, DraftModel, check_vocab
from coordinator.speculation.drafting import Drafter
from coordinator.speculation.gamma import SPEC_DEPTH_HELP, DraftCosts, GammaConfig
from coordinator.speculation.ngram import NgramDrafter
from coordinator.tokenizer import Tokenizer

log = logging.getLogger(__name__)

PROMPTS = (
    "Write a Python class implementing a binary search tree with insert, delete, search "
    "and in-order traversal. Include docstrings and type hints.",
    "Write a C function that parses a decimal integer from a string, with overflow checks.",
    "Write a JavaScript function that debounces another function, with a usage example.",
    "Write a Rust function that counts word frequencies in a text and returns the ten "
    "most frequent words.",
)
GREEDY = SamplingParams()
TARGET_TOKENS_PER_STEP = 3.0  # issue 4's goal for the demo pair at T=0
PLAIN, NGRAM, ADAPTIVE, MODEL_AT = "none", "ngram", "model adaptive", "model gamma="
AHEAD = " run-ahead"  # a mode's projection with run-ahead windows


@dataclass(frozen=True)
class SpecBenchConfig:
    model: str = "demo"
    draft: str = "demo"
    tokens: int = 128
    gammas: tuple[int, ...] = (4, 8)
    profile: str = "2x4070"
    inprocess: bool = False
    workers: int = 2
    pin: bool = False
    threads: int | None = None  # per stage; default: 1 per worker, all cores in-process
    ctx: int = 1024
    depth: int | None = None  # run-ahead windows in flight; None: chosen by the costs


@dataclass
class ModeResult:
    """One mode's runs over every prompt, summed."""

    name: str
    gamma: int | None = None  # fixed γ; None when the controller adapts it
    tokens: int = 0  # decoded after the first (the prefill's) token
    steps: int = 0  # decode steps
    decode_s: float = 0.0
    proposed: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)
    same_as_plain: int = 0
    runs: int = 0
    # (prompt, first differing token, the plain run's top-2 logit gap there): batch shapes
    # round differently, so a near tie may flip (tests/test_speculative.py measured ≤ 0.41).
    divergences: list[tuple[int, int, float]] = field(default_factory=list)
    draft_costs: dict[str, float] | None = None  # what adaptive γ decided from

    def add(self, run: Generation, plain: Generation) -> None:
        stats = run.stats
        self.tokens += stats.n_tokens - 1
        self.steps += stats.steps - 1
        self.decode_s += stats.decode_s
        for k, (p, a) in enumerate(zip(stats.proposed, stats.accepted, strict=True)):
            if k == len(self.proposed):
                self.proposed.append(0)
                self.accepted.append(0)
            self.proposed[k] += p
            self.accepted[k] += a
        diff = first_difference(run.tokens, plain.tokens)
        if diff is None:
            self.same_as_plain += 1
        else:
            self.divergences.append((self.runs, diff, plain.top2_gaps[diff]))
        self.runs += 1

    @property
    def acceptance(self) -> list[float]:
        """Entry k: share of steps with a (k+1)-th guess whose guesses 1..k+1 were kept."""
        return [a / p if p else 0.0 for a, p in zip(self.accepted, self.proposed, strict=True)]

    @property
    def gamma_mean(self) -> float:
        return sum(self.proposed) / self.steps if self.steps else 0.0

    def as_dict(self) -> dict[str, object]:
        steps = max(self.steps, 1)
        out: dict[str, object] = {
            "tokens_per_step": round(self.tokens / steps, 3),
            "acceptance_by_position": [round(a, 3) for a in self.acceptance],
            "gamma_mean": round(self.gamma_mean, 3),
            "tok_s": round(self.tokens / self.decode_s, 3) if self.decode_s else 0.0,
            "same_as_plain": f"{self.same_as_plain}/{self.runs}",
            "diverged_at": [{"prompt": p, "token": t, "plain_top2_gap": round(g, 4)}
                            for p, t, g in self.divergences],
        }
        if self.draft_costs is not None:
            out["draft_costs"] = self.draft_costs
        return out


def first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)


def stage_threads(config: SpecBenchConfig) -> int:
    if config.threads is not None:
        return config.threads
    # Workers stand for one box each (one core here); in-process stages run in turn.
    return (os.cpu_count() or 1) if config.inprocess else 1


def open_ring(config: SpecBenchConfig, model: Path, stack: ExitStack) -> BuiltRing:
    split = even_split(inspect_model(model).n_layer, config.workers)
    workers = None if config.inprocess else LocalWorkers(config.workers, pin=config.pin).start()
    try:
        built = build_ring(model, workers=workers, stages=config.workers, ctx=config.ctx,
                           threads=stage_threads(config), split=split)
    except BaseException:
        if workers is not None:
            workers.stop()
        raise
    stack.callback(built.close)
    return built


@dataclass(frozen=True)
class Mode:
    name: str
    drafter: Drafter | None
    gamma: GammaConfig


def modes_of(config: SpecBenchConfig, drafter: DraftModel) -> list[Mode]:
    """No draft first: every other mode is compared with it."""
    depth = config.depth
    modes = [Mode(PLAIN, None, GammaConfig()),
             Mode(NGRAM, NgramDrafter(), GammaConfig(depth=depth))]
    modes += [Mode(f"{MODEL_AT}{g}", drafter, GammaConfig(fixed=g, depth=depth))
              for g in config.gammas]
    return [*modes, Mode(ADAPTIVE, drafter, GammaConfig(depth=depth))]


def mode_gamma(name: str) -> int | None:
    return int(name.removeprefix(MODEL_AT)) if name.startswith(MODEL_AT) else None


def decode(built: BuiltRing, tokenizer: Tokenizer, mode: Mode, prompt: list[int],
           n_tokens: int, costs: dict[int, DraftCosts]) -> tuple[Generation, DraftCosts]:
    """One prompt through a fresh engine of this mode (the ring stays loaded); adaptive
    modes reuse their drafter's calibrated costs after the first prompt."""
    known = costs.get(id(mode.drafter))
    engine = start_engine(built, tokenizer, "bench", mode.drafter,
                          EngineOptions(gamma=mode.gamma), costs=known)
    try:
        run = engine.generate(GenerationRequest(prompt, n_tokens, GREEDY, ignore_eos=True,
                                                with_gaps=True))
    finally:
        engine.close()
    policy_costs = engine.core.policy.costs
    if mode.drafter is not None and mode.gamma.fixed is None:
        costs[id(mode.drafter)] = policy_costs
    return run, policy_costs


def measure(config: SpecBenchConfig, built: BuiltRing, tokenizer: Tokenizer,
            drafter: DraftModel, prompts: list[list[int]]) -> dict[str, ModeResult]:
    modes = modes_of(config, drafter)
    results = {m.name: ModeResult(m.name, mode_gamma(m.name)) for m in modes}
    costs: dict[int, DraftCosts] = {}
    # The first decodes pay page faults and weight repacking; no result sees them.
    decode(built, tokenizer, modes[0], prompts[0], 8, costs)
    decode(built, tokenizer, modes[2], prompts[0], 8, costs)
    with tqdm(total=len(prompts) * len(modes), desc="spec bench", leave=False,
              disable=not sys.stderr.isatty()) as bar:
        for prompt in prompts:
            plain: Generation | None = None
            for mode in modes:
                run, used = decode(built, tokenizer, mode, prompt, config.tokens, costs)
                plain = plain or run  # PLAIN runs first
                results[mode.name].add(run, plain)
                if mode.drafter is not None and mode.gamma.fixed is None:
                    results[mode.name].draft_costs = used.as_dict()
                bar.update()
    return results


@dataclass
class SpecBenchResult:
    config: SpecBenchConfig
    model: str
    draft: str
    n_prompts: int
    modes: dict[str, ModeResult]

    def projections(self) -> dict[str, Projection]:
        """The measured acceptance on the profile's hardware, at each mode's γ."""
        profile = get_profile(self.config.profile)
        out = {PLAIN: baseline(profile)}
        for name, r in self.modes.items():
            if name != PLAIN:
                gamma = r.gamma or max(1, round(r.gamma_mean))
                out[name] = project(profile, r.acceptance, gamma)
                out[name + AHEAD] = project_ahead(profile, r.acceptance, gamma)
        return out

    def deepest(self) -> ModeResult:
        """The draft-model mode with acceptance measured at the most positions."""
        return max((r for n, r in self.modes.items() if n.startswith("model")),
                   key=lambda r: len(r.acceptance))

    def as_dict(self) -> dict[str, object]:
        c = self.config
        best_rate = max(r.tokens / max(r.steps, 1) for r in self.modes.values())
        deepest = self.deepest()
        return {
            "bench": "spec", "model": self.model, "draft": self.draft,
            "prompts": self.n_prompts, "tokens": c.tokens, "temperature": 0.0,
            "pipeline": "in-process" if c.inprocess else f"{c.workers} gRPC workers",
            "threads_per_stage": stage_threads(c),
            "target_tokens_per_step": TARGET_TOKENS_PER_STEP,
            "meets_target": best_rate >= TARGET_TOKENS_PER_STEP,
            "modes": {name: r.as_dict() for name, r in self.modes.items()},
            "projection": {
                "profile": c.profile,
                "by_mode": {n: p.as_dict() for n, p in self.projections().items()},
                # No extrapolation past the positions measured.
                "best": best_projection(get_profile(c.profile), deepest.acceptance,
                                        gamma_max=len(deepest.acceptance)).as_dict(),
                "best_from": deepest.name,
            },
        }

    def table(self) -> str:
        """The modes as a table a person can read."""
        projected = self.projections()
        head = f"{self.config.profile} tok/s"
        lines = [f"{'mode':<16}{'γ mean':>8}{'tok/step':>10}{'tok/s':>8}{head:>16}"
                 "  acceptance by position"]
        for name, r in self.modes.items():
            accept = " ".join(f"{a:.2f}" for a in r.acceptance)
            rate = r.tokens / r.decode_s if r.decode_s else 0.0
            lines.append(f"{name:<16}{r.gamma_mean:>8.2f}{r.tokens / max(r.steps, 1):>10.2f}"
                         f"{rate:>8.2f}{projected[name].tok_s:>16.1f}  {accept}")
            if name + AHEAD in projected:
                lines.append(f"{'  ' + AHEAD.strip():<42}{projected[name + AHEAD].tok_s:>16.1f}"
                             "  (projection: run-ahead windows, one per node)")
        return "\n".join(lines)


def run_bench(config: SpecBenchConfig) -> SpecBenchResult:
    model, draft = models.resolve(config.model), models.resolve(config.draft, "draft")
    check_vocab(model, draft)
    get_profile(config.profile)  # an unknown profile fails before the long part
    tokenizer = Tokenizer(model)
    prompts = [tokenizer.encode(tokenizer.chat_prompt([{"role": "user", "content": p}]))
               for p in PROMPTS]
    with ExitStack() as stack:
        drafter = DraftModel(DraftConfig(draft, n_ctx=config.ctx,
                                         n_threads=stage_threads(config)))
        stack.callback(drafter.close)
        built = open_ring(config, model, stack)
        modes = measure(config, built, tokenizer, drafter, prompts)
    return SpecBenchResult(config, model.name, draft.name, len(prompts), modes)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="demo", help="target GGUF, or 'demo' (default)")
    p.add_argument("--draft", default="demo", help="draft GGUF, or 'demo' (default)")
    p.add_argument("--tokens", type=int, default=128, help="tokens per prompt (default 128)")
    p.add_argument("--gammas", type=int, nargs="+", default=[4, 8],
                   help="fixed draft lengths to measure (default 4 8)")
    p.add_argument("--profile", default="2x4070", help="hardware profile for the projection")
    p.add_argument("--inprocess", action="store_true",
                   help="stages in this process (LocalRing), not gRPC workers")
    p.add_argument("--workers", type=int, default=2, help="stages / workers (default 2)")
    p.add_argument("--pin", action="store_true", help="each worker on its own core")
    p.add_argument("--threads", type=int, help="threads per stage and for the draft")
    p.add_argument("--ctx", type=int, default=1024)
    p.add_argument("--spec-depth", type=int, help=SPEC_DEPTH_HELP)


def config_from_args(args: argparse.Namespace) -> SpecBenchConfig:
    if args.tokens < 2 or args.workers < 1 or (args.threads is not None and args.threads < 1):
        raise SpecshardError("need --tokens ≥ 2, --workers ≥ 1, --threads ≥ 1")
    if not all(1 <= g <= 16 for g in args.gammas):
        raise SpecshardError("--gammas must be in 1..16")
    gamma_config(None, 16, args.spec_depth)  # checked as generate and serve check it
    return SpecBenchConfig(model=args.model, draft=args.draft, tokens=args.tokens,
                           gammas=tuple(args.gammas), profile=args.profile,
                           inprocess=args.inprocess, workers=args.workers, pin=args.pin,
                           threads=args.threads, ctx=args.ctx, depth=args.spec_depth)
