"""Putting the coordinator together: a built ring, a drafter, the engine (every command),
and what `serve` and `demo` start around them (workers, Ray, the watcher)."""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path

from cluster import models
from cluster.auth import read_token, tls_from_args
from cluster.errors import SpecshardError
from cluster.gguf_file import read_header
from cluster.model_info import model_info
from cluster.rope import context_warning, rope_from_settings
from coordinator.engine.core import EngineCore
from coordinator.engine.frontend import Engine
from coordinator.engine.scheduler import SchedulerConfig
from coordinator.metrics import Metrics
from coordinator.placement.ray_actors import RayWorkers
from coordinator.ring.builder import BuiltRing, build_ring
from coordinator.ring.supervisor import StaticWorkers, WorkerSet
from coordinator.settings import ServeSettings
from coordinator.speculation.draft import DraftConfig, DraftModel, check_vocab
from coordinator.speculation.drafting import Drafter
from coordinator.speculation.gamma import DraftCosts, GammaConfig, GammaPolicy
from coordinator.speculation.ngram import NgramDrafter
from coordinator.tokenizer import Tokenizer

log = logging.getLogger(__name__)
CALIBRATION_TEXT = "def add(a, b):\n    return a + b\n\n\ndef mul(a, b):\n    return a * b\n"


@dataclass(frozen=True)
class EngineOptions:
    queue_size: int = 16
    max_batch_tokens: int = 512
    prefill_chunk: int = 256
    micro_batches: int | None = None  # default: one per stage
    max_stall: float = 2.0  # see SchedulerConfig
    gamma: GammaConfig = GammaConfig()
    cache_prompt: bool = True  # finished sequences' caches stay for the next request
    share_prefix: bool = True  # prompt prefixes other slots hold are copied, not computed

    def __post_init__(self) -> None:
        if self.queue_size < 0:
            raise SpecshardError("--queue-size must be ≥ 0")
        if self.max_batch_tokens < 1 or self.prefill_chunk < 1:
            raise SpecshardError("--max-batch-tokens and --prefill-chunk must be ≥ 1")
        if self.micro_batches is not None and self.micro_batches < 1:
            raise SpecshardError("--micro-batches must be ≥ 1")
        if self.max_stall < 1:
            raise SpecshardError("--max-stall must be ≥ 1")


def open_drafter(mode: str, draft: str | None, model: Path, ctx: int, parallel: int,
                 threads: int) -> Drafter | None:
    """`mode` is model (needs `draft`), ngram, none, or auto (model when a draft is given).

    One draft model serves every sequence: one set of weights, one KV stream per slot."""
    mode = mode if mode != "auto" else ("model" if draft else "none")
    if mode == "none":
        return None
    if mode == "ngram":
        return NgramDrafter()
    if mode != "model" or not draft:
        raise SpecshardError("--draft-mode is model (needs --draft), ngram, none or auto")
    path = models.resolve(draft, "draft")
    check_vocab(model, path)
    return DraftModel(DraftConfig(path, n_ctx=ctx, n_seq_max=parallel,
                                  n_threads=check_threads(threads)))


def start_engine(built: BuiltRing, tokenizer: Tokenizer, name: str,
                 drafter: Drafter | None = None, options: EngineOptions = EngineOptions(),
                 metrics: Metrics | None = None, costs: DraftCosts | None = None) -> Engine:
    """The engine over a built ring, the ring's (and draft's) costs measured first unless
    `costs` gives them (a few seconds on a CPU, milliseconds on a GPU)."""
    config = SchedulerConfig(options.max_batch_tokens, options.prefill_chunk,
                             options.micro_batches or built.n_stages, options.max_stall)
    core = EngineCore(built.ring, tokenizer, config, drafter, GammaPolicy(options.gamma),
                      metrics, rebuilder=built.supervisor, cache_prompt=options.cache_prompt,
                      share_prefix=options.share_prefix)
    if costs is not None:
        core.use_costs(costs)
    else:
        core.calibrate(tokenizer.encode(CALIBRATION_TEXT, add_bos=False)[:32])
    if built.supervisor is not None:
        built.supervisor.watch()
    return Engine(core, tokenizer, name, options.queue_size)


@dataclass
class RunningCluster:
    engine: Engine
    built: BuiltRing
    drafter: Drafter | None = None

    def describe(self) -> dict[str, object]:
        info: dict[str, object] = self.built.supervisor.describe() if self.built.supervisor \
            else {"nodes": [], "plan": None, "restarts": 0}
        workers = self.built.workers
        if isinstance(workers, RayWorkers):
            nodes: list[dict[str, object]] = info["nodes"]  # type: ignore[assignment]
            for node, ray_node in zip(nodes, workers.node_ids(), strict=True):
                node["ray_node_id"] = ray_node
        core = self.engine.core
        return {**info, "model": self.engine.model_name, "parallel": self.engine.parallel,
                "n_ctx": self.engine.n_ctx, "micro_batches": core.config.micro_batches,
                "max_batch_tokens": core.config.max_batch_tokens,
                "prefill_chunk": core.config.prefill_chunk,
                "costs": core.policy.costs.as_dict()}

    def close(self, drain_timeout_s: float = 0.0) -> None:
        """Requests end first (given `drain_timeout_s` to finish), then the ring."""
        try:
            self.engine.close(drain_timeout_s)
        finally:
            try:
                if self.drafter is not None:
                    self.drafter.close()
            finally:
                self.built.close()


def _workers(s: ServeSettings) -> tuple[WorkerSet, bool]:
    """The worker set asked for, and whether its workers share this machine's disk."""
    chosen = [bool(s.ray), bool(s.local_workers), bool(s.worker)]
    if sum(chosen) != 1:
        raise SpecshardError("choose one of --ray [ADDRESS], --local-workers N, "
                             "--worker HOST:PORT")
    tls = tls_from_args(s.tls_cert, s.tls_key, s.tls_ca)
    token = read_token(s.token_file) if s.token_file else None
    if s.local_workers:
        return RayWorkers(s.local_workers, local=True, tls=tls, token=token).start(), True
    if s.ray:
        return RayWorkers(s.workers, address=s.ray, tls=tls, token=token).start(), False
    return StaticWorkers(s.worker, token, tls, wait_s=s.worker_wait), False


def check_threads(threads: int) -> int:
    """`--threads` (llama.cpp threads per stage and for the draft), checked once for every
    command."""
    if threads < 1:
        raise SpecshardError("--threads must be at least 1")
    return threads


def gamma_config(fixed: int | None, gamma_max: int, depth: int | None = None) -> GammaConfig:
    """`--gamma`, `--gamma-max` and `--spec-depth`, checked once for every command."""
    try:
        return GammaConfig(fixed=fixed, gamma_max=gamma_max, depth=depth)
    except ValueError as exc:
        raise SpecshardError(f"--gamma/--gamma-max/--spec-depth: {exc}") from None


def engine_options(s: ServeSettings) -> EngineOptions:
    gamma = gamma_config(s.gamma, s.gamma_max, s.spec_depth)
    return EngineOptions(queue_size=s.queue_size, max_batch_tokens=s.max_batch_tokens,
                         prefill_chunk=s.prefill_chunk, micro_batches=s.micro_batches,
                         max_stall=s.max_stall, gamma=gamma, cache_prompt=s.cache_prompt,
                         share_prefix=s.share_prefix)


def start_cluster(s: ServeSettings, progress: bool = False) -> RunningCluster:
    """Workers, the ring, the drafter and the engine, as `serve` and `demo` run them."""
    if s.parallel < 1 or s.ctx < 1:
        raise SpecshardError("need --parallel ≥ 1 and --ctx ≥ 1")
    check_threads(s.threads)
    options = engine_options(s)
    model = models.resolve(s.model)
    header = read_header(model)
    rope = rope_from_settings(s, header)
    warning = context_warning(s.ctx, model_info(header).n_ctx_train, rope)
    if warning:
        print(f"specshard: warning: {warning}", file=sys.stderr)
    tokenizer = Tokenizer(model)
    metrics = Metrics()
    # A bad draft is refused before any worker starts.
    drafter = open_drafter(s.draft_mode, s.draft, model, s.ctx, s.parallel, s.threads)
    built: BuiltRing | None = None
    try:
        workers, shared_disk = _workers(s)
        try:
            draft_path = models.resolve(s.draft, "draft") if s.draft else None
            built = build_ring(model, workers=workers,
                               model_ref=str(model) if shared_disk else s.model, ctx=s.ctx,
                               parallel=s.parallel, threads=s.threads, draft=draft_path,
                               metrics=metrics, progress=progress, rope=rope)
        except BaseException:
            workers.stop()
            raise
        engine = start_engine(built, tokenizer, s.name or model.stem, drafter, options,
                              metrics)
    except BaseException:
        if built is not None:
            built.close()
        if drafter is not None:
            drafter.close()
        raise
    return RunningCluster(engine, built, drafter)
