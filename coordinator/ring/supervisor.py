"""The workers as one ring: plan, load, watch, and rebuild after a worker is lost.

This is the one place a ring of workers is built, whoever runs the workers (local
processes, Ray actors, or machines the user started): `RingSupervisor.start`.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Protocol

from cluster.auth import TlsFiles
from cluster.messages import LoadSpec, NodeInfo
from cluster.planning.plans import Plan
from cluster.rope import RopeParams
from coordinator.metrics import Metrics
from coordinator.placement.plan import check_loaded, load_specs, plan_ring
from coordinator.ring.contract import Sink, WorkerLost
from coordinator.ring.grpc_ring import GrpcRing, WorkerClient

log = logging.getLogger(__name__)
RESTART_TIMEOUT_S = 120.0
# A worker answers health checks from its event loop while its stage computes on
# another thread (worker/server.py), so a slow batch does not delay the answer.
HEALTH_TIMEOUT_S = 3.0


class WorkerSet(Protocol):
    """Whoever runs the worker processes: Ray actors, local processes, or the user."""

    @property
    def token(self) -> str | None: ...

    @property
    def tls(self) -> TlsFiles | None: ...

    @property
    def addresses(self) -> list[str]: ...  # in ring order; restart may change one

    def dead(self) -> list[int]: ...  # workers known to be gone, cheaply (no network)

    def restart(self, i: int) -> str: ...  # bring worker i back (maybe elsewhere): address

    def pids(self) -> list[int | None]: ...

    def stop(self) -> None: ...


class StaticWorkers:
    """Workers someone else runs (`--worker HOST:PORT`): a lost one is waited for."""

    def __init__(self, addresses: list[str], token: str | None, tls: TlsFiles | None,
                 wait_s: float = RESTART_TIMEOUT_S) -> None:
        self.addresses, self.token, self.tls = list(addresses), token, tls
        self.wait_s = wait_s

    def dead(self) -> list[int]:
        return []

    def restart(self, i: int) -> str:
        client = WorkerClient(self.addresses[i], self.token, self.tls)
        try:
            deadline = time.monotonic() + self.wait_s
            while not client.healthy():
                if time.monotonic() > deadline:
                    raise WorkerLost(f"worker {self.addresses[i]} did not come back within "
                                     f"{self.wait_s:.0f} s")
                time.sleep(0.5)
        finally:
            client.close()
        return self.addresses[i]

    def pids(self) -> list[int | None]:
        return [None] * len(self.addresses)

    def stop(self) -> None:
        pass


class RingSupervisor:
    def __init__(self, workers: WorkerSet, model: Path, model_ref: str, ctx: int,
                 parallel: int, n_threads: int, metrics: Metrics | None = None,
                 draft: Path | None = None, specs: list[LoadSpec] | None = None,
                 health_timeout_s: float = HEALTH_TIMEOUT_S, rope: RopeParams | None = None
                 ) -> None:
        self.workers = workers
        self.rope = rope
        self.model, self.model_ref, self.draft = model, model_ref, draft
        self.ctx, self.parallel, self.n_threads = ctx, parallel, n_threads
        self.metrics = metrics or Metrics()
        self.plan: Plan | None = None
        self.specs: list[LoadSpec] = list(specs or [])  # given: no planning
        self.infos: list[NodeInfo] = []
        self.ring: GrpcRing | None = None
        self.restarts = 0
        self.health_timeout_s = health_timeout_s
        self.health: list[bool] = []
        self._clients: list[WorkerClient] = []
        self._lock = threading.Lock()  # a rebuild and a health check never interleave
        self._watcher: threading.Thread | None = None
        self._stop = threading.Event()

    # --- building ----------------------------------------------------------------------

    def start(self, progress: bool = False) -> GrpcRing:
        """Ask the workers what they have, plan (unless specs were given), load."""
        self._clients = [WorkerClient(a, self.workers.token, self.workers.tls)
                         for a in self.workers.addresses]
        self.infos = [c.node_info() for c in self._clients]
        if not self.specs:
            self.plan = plan_ring(self.model, self.workers.addresses, self.infos, self.ctx,
                                  self.parallel, self.draft, self.rope)
            self.specs = load_specs(self.plan, self.model_ref, self.n_threads, self.rope)
        self.ring = self._load(progress)
        self.infos = self.ring.node_infos()  # now with the stages (and their capture)
        check_loaded(self.specs, self.infos, self.workers.addresses)
        self.health = [True] * len(self.specs)
        return self.ring

    def _load(self, progress: bool = False) -> GrpcRing:
        ring = GrpcRing(self.workers.addresses, self.workers.token, self.workers.tls,
                        clients=self._clients)
        try:
            ring.load(self.specs, progress=progress)
        except BaseException:
            ring.close()
            raise
        return ring

    def unhealthy(self) -> list[int]:
        bad = set(self.workers.dead())
        for i, client in enumerate(self._clients):
            if i not in bad and not client.healthy(timeout_s=self.health_timeout_s):
                bad.add(i)
        self.health = [i not in bad for i in range(len(self._clients))]
        return sorted(bad)

    def rebuild(self, sink: Sink) -> GrpcRing:
        """Restart what is lost, reload and reconnect the ring, clear every cache."""
        with self._lock:
            if self.ring is not None:
                self.ring.close()
                self.ring = None
            for i in self.unhealthy():
                log.warning("worker %d (%s) is lost: restarting it", i,
                            self.workers.addresses[i])
                address = self.workers.restart(i)
                self._clients[i].close()
                self._clients[i] = WorkerClient(address, self.workers.token, self.workers.tls)
                self.restarts += 1
            ring = self._load()
            try:
                ring.connect(sink)
                ring.truncate_all([], 0)
                self.infos = ring.node_infos()
                # a restarted worker may be another build or host: the same check as
                # `start`, or it would compute with other RoPE values unnoticed
                check_loaded(self.specs, self.infos, self.workers.addresses)
            except BaseException:
                ring.close()
                raise
            self.health = [True] * len(self._clients)
            self.ring = ring
            return ring

    # --- watching ----------------------------------------------------------------------

    def watch(self, every_s: float = 1.0) -> None:
        """Check the workers in the background; a worker found gone loses the ring it
        belongs to (`GrpcRing.lose`), which tells the engine through the ring's own sink
        — so a loss seen on a ring that a rebuild already replaced is never reported.
        Once per supervisor: every engine started on the ring shares the one watcher."""
        if self._watcher is not None:
            return

        def loop() -> None:
            while not self._stop.wait(every_s):
                try:
                    with self._lock:
                        bad = self.unhealthy()
                        ring = self.ring
                    if bad and ring is not None:
                        ring.lose("worker(s) " + ", ".join(self.workers.addresses[i]
                                                           for i in bad) + " stopped answering")
                except Exception:  # a failed check is retried at the next tick
                    log.exception("worker check failed")

        self._watcher = threading.Thread(target=loop, daemon=True, name="ring-watch")
        self._watcher.start()

    def describe(self) -> dict[str, object]:
        """Nodes, GPUs, the plan, each worker's last known health and pid (no network:
        the watcher keeps `health` current)."""
        pids = self.workers.pids()
        nodes = []
        for i, address in enumerate(self.workers.addresses):
            info = self.infos[i] if i < len(self.infos) else None
            nodes.append({
                "address": address, "healthy": self.health[i] if i < len(self.health)
                else None, "pid": pids[i],
                "hostname": info.host.hostname if info else None,
                "gpus": [asdict(g) for g in info.host.gpus] if info else [],
                "gpu_note": info.host.gpu_error if info else None,
                "capture": (info.capture or None) if info else None,
                "stage": asdict(self.specs[i]) if i < len(self.specs) else None,
                # what the worker says it computes with (checked against the plan's)
                "rope": asdict(info.stage.rope) if info and info.stage and info.stage.rope
                else None,
            })
        return {"nodes": nodes, "plan": self.plan.to_json() if self.plan else None,
                "restarts": self.restarts}

    def close(self) -> None:
        self._stop.set()
        if self._watcher:
            self._watcher.join(timeout=10)
        if self.ring:
            self.ring.close()
        for client in self._clients:
            client.close()
