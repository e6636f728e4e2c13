"""Everything `serve` and `demo` start: workers, the ring, recovery, drafts, the engine."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from cluster import models
from cluster.auth import read_token, tls_from_args
from cluster.errors import SpecshardError
from coordinator.draft import DraftConfig, ModelDrafter, check_vocab
from coordinator.engine import Engine
from coordinator.gamma import GammaConfig, GammaController
from coordinator.generate import Drafter
from coordinator.metrics import Metrics
from coordinator.ngram import NgramDrafter
from coordinator.ray_workers import RayWorkers
from coordinator.recovery import ResilientPipeline
from coordinator.ring import Ring, StaticWorkers, WorkerSet
from coordinator.settings import ServeSettings
from coordinator.tokenizer import Tokenizer

log = logging.getLogger(__name__)


@dataclass
class RunningCluster:
    engine: Engine
    ring: Ring
    workers: WorkerSet
    drafters: list[Drafter | None] = field(default_factory=list)

    def describe(self) -> dict[str, object]:
        info = self.ring.describe()
        if isinstance(self.workers, RayWorkers):
            nodes: list[dict[str, object]] = info["nodes"]  # type: ignore[assignment]
            for node, ray_node in zip(nodes, self.workers.node_ids(), strict=True):
                node["ray_node_id"] = ray_node
        return {**info, "model": self.engine.model_name, "parallel": self.engine.parallel}

    def close(self) -> None:
        self.engine.drain()  # requests end before the ring they run on
        for drafter in self.drafters:
            close = getattr(drafter, "close", None)
            if close:
                close()
        self.ring.close()
        self.workers.stop()


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
    return StaticWorkers(s.worker, token, tls), False


def make_drafter(s: ServeSettings, model: Path) -> Drafter | None:
    mode = s.draft_mode if s.draft_mode != "auto" else ("model" if s.draft else "none")
    gamma = GammaController(GammaConfig(fixed=s.gamma))
    if mode == "none":
        return None
    if mode == "ngram":
        return NgramDrafter(gamma=gamma)
    if mode != "model" or not s.draft:
        raise SpecshardError("--draft-mode is model (needs --draft), ngram, none or auto")
    draft = models.resolve(s.draft, "draft")
    check_vocab(model, draft)
    return ModelDrafter(DraftConfig(draft, n_ctx=s.ctx, n_threads=max(s.threads, 1)), gamma)


def start_cluster(s: ServeSettings, progress: bool = False) -> RunningCluster:
    if s.parallel < 1 or s.ctx < 1 or s.queue_size < 0:
        raise SpecshardError("need --parallel ≥ 1, --ctx ≥ 1 and --queue-size ≥ 0")
    model = models.resolve(s.model)
    tokenizer = Tokenizer(model)
    metrics = Metrics()
    workers, shared_disk = _workers(s)
    drafters: list[Drafter | None] = []
    try:
        ring = Ring(workers, model, str(model) if shared_disk else s.model, s.ctx, s.parallel,
                    s.threads, metrics)
        ring.start(progress)
        pipeline = ResilientPipeline(ring)
        ring.watch(pipeline.recover_now)
        drafters = [make_drafter(s, model) for _ in range(s.parallel)]
    except BaseException:
        for d in drafters:
            getattr(d, "close", lambda: None)()
        workers.stop()
        raise
    engine = Engine(pipeline, tokenizer, s.name or model.stem, parallel=s.parallel,
                    queue_size=s.queue_size, drafters=drafters, metrics=metrics)
    return RunningCluster(engine, ring, workers, drafters)
