"""The workers as one ring: plan, load, watch, and rebuild after a worker is lost."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Protocol

from cluster.auth import TlsFiles
from cluster.errors import SpecshardError
from cluster.messages import LoadSpec, NodeInfo
from cluster.plans import Plan
from coordinator.grpc_pipeline import GrpcPipeline, WorkerClient
from coordinator.metrics import Metrics
from coordinator.placement import load_specs, plan_ring

log = logging.getLogger(__name__)
RESTART_TIMEOUT_S = 120.0


class WorkerSet(Protocol):
    """Whoever runs the worker processes: Ray actors, local processes, or the user."""

    token: str | None
    tls: TlsFiles | None
    addresses: list[str]

    def dead(self) -> list[int]: ...  # workers known to be gone, cheaply (no network)

    def restart(self, i: int) -> str: ...  # bring worker i back (maybe elsewhere): address

    def pids(self) -> list[int | None]: ...

    def stop(self) -> None: ...


class StaticWorkers:
    """Workers someone else runs (`--worker HOST:PORT`): a lost one is waited for."""

    def __init__(self, addresses: list[str], token: str | None, tls: TlsFiles | None) -> None:
        self.addresses, self.token, self.tls = list(addresses), token, tls

    def dead(self) -> list[int]:
        return []

    def restart(self, i: int) -> str:
        client = WorkerClient(self.addresses[i], self.token, self.tls)
        try:
            deadline = time.monotonic() + RESTART_TIMEOUT_S
            while not client.healthy():
                if time.monotonic() > deadline:
                    raise SpecshardError(f"worker {self.addresses[i]} did not come back")
                time.sleep(0.5)
        finally:
            client.close()
        return self.addresses[i]

    def pids(self) -> list[int | None]:
        return [None] * len(self.addresses)

    def stop(self) -> None:
        pass


class Ring:
    def __init__(self, workers: WorkerSet, model: Path, model_ref: str, ctx: int,
                 parallel: int, n_threads: int, metrics: Metrics) -> None:
        self.workers = workers
        self.model, self.model_ref = model, model_ref
        self.ctx, self.parallel, self.n_threads = ctx, parallel, n_threads
        self.metrics = metrics
        self.plan: Plan | None = None
        self.specs: list[LoadSpec] = []
        self.infos: list[NodeInfo] = []
        self.pipeline: GrpcPipeline | None = None
        self.restarts = 0
        self._watcher: threading.Thread | None = None
        self._stop = threading.Event()

    def start(self, progress: bool = False) -> GrpcPipeline:
        probe = GrpcPipeline(self.workers.addresses, self.workers.token, self.workers.tls)
        try:
            self.infos = probe.node_infos()
        finally:
            probe.close()
        self.plan = plan_ring(self.model, self.workers.addresses, self.infos, self.ctx,
                              self.parallel)
        self.specs = load_specs(self.plan, self.model_ref, self.n_threads)
        self.pipeline = self._connect(progress)
        return self.pipeline

    def _connect(self, progress: bool = False) -> GrpcPipeline:
        pipeline = GrpcPipeline(self.workers.addresses, self.workers.token, self.workers.tls)
        try:
            pipeline.load(self.specs, progress=progress)
        except BaseException:
            pipeline.close()
            raise
        return pipeline

    def unhealthy(self) -> list[int]:
        bad = set(self.workers.dead())
        for i, address in enumerate(self.workers.addresses):
            if i in bad:
                continue
            client = WorkerClient(address, self.workers.token, self.workers.tls)
            try:
                if not client.healthy(timeout_s=3.0):
                    bad.add(i)
            finally:
                client.close()
        return sorted(bad)

    def rebuild(self) -> GrpcPipeline:
        """Restart what is lost, reconnect the ring, and clear every sequence everywhere."""
        if self.pipeline is not None:
            self.pipeline.close()
            self.pipeline = None
        for i in self.unhealthy():
            log.warning("worker %d (%s) is lost: restarting it", i, self.workers.addresses[i])
            self.workers.restart(i)
            self.restarts += 1
            self.metrics.restarts.inc()
        pipeline = self._connect()
        pipeline.truncate_all([], 0)
        self.pipeline = pipeline
        return pipeline

    def watch(self, on_loss: Callable[[], None], every_s: float = 1.0) -> None:
        """Check the workers in the background; call `on_loss` when one is gone."""
        def loop() -> None:
            while not self._stop.wait(every_s):
                try:
                    if self.workers.dead() or self.unhealthy():
                        on_loss()
                except Exception:  # a failed check is retried at the next tick
                    log.exception("worker check failed")

        self._watcher = threading.Thread(target=loop, daemon=True, name="ring-watch")
        self._watcher.start()

    def describe(self) -> dict[str, object]:
        """Nodes, GPUs, the plan, and each worker's health and pid (`GET /v1/cluster`)."""
        pids = self.workers.pids()
        nodes = []
        for i, address in enumerate(self.workers.addresses):
            info = self.infos[i] if i < len(self.infos) else None
            client = WorkerClient(address, self.workers.token, self.workers.tls)
            try:
                healthy = client.healthy(timeout_s=2.0)
            finally:
                client.close()
            nodes.append({
                "address": address, "healthy": healthy, "pid": pids[i],
                "hostname": info.host.hostname if info else None,
                "gpus": [asdict(g) for g in info.host.gpus] if info else [],
                "gpu_note": info.host.gpu_error if info else None,
                "stage": asdict(self.specs[i]) if i < len(self.specs) else None,
            })
        return {"nodes": nodes, "plan": self.plan.to_json() if self.plan else None,
                "restarts": self.restarts}

    def close(self) -> None:
        self._stop.set()
        if self._watcher:
            self._watcher.join(timeout=5)
        if self.pipeline:
            self.pipeline.close()
