"""Workers as Ray actors: one per GPU, placed by a placement group.

The coordinator is the Ray driver. Each actor runs the gRPC worker in its own process,
on the one GPU Ray gives it (Ray sets CUDA_VISIBLE_DEVICES for an actor with
num_gpus=1), and reports its endpoint; a never-ending call on it is the death sentinel.
Ray restarts an actor whose process dies (`max_restarts=-1`); `restart` then starts its
worker again and returns the new endpoint.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.util.placement_group import (
    PlacementGroup,
    placement_group,
    placement_group_table,
    remove_placement_group,
)
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.auth import TlsFiles, new_token
from cluster.errors import SpecshardError
from coordinator.placement.local import SPIN_POLICY

log = logging.getLogger(__name__)
START_TIMEOUT_S = 120.0


@ray.remote(max_restarts=-1, max_task_retries=0)
class WorkerActor:
    """Hosts one gRPC worker; its process is the worker process."""

    def __init__(self) -> None:
        self._worker: Any = None  # worker.server.RunningWorker, imported in the actor

    async def start(self, host: str | None, token: str | None, tls: TlsFiles | None,
                    name: str) -> dict[str, object]:
        """Start the worker; `host` None binds the node's address (other nodes dial it)."""
        # Ray counts a node's GPUs with NVML and hands out NVML's (nvidia-smi's) numbers;
        # CUDA reads them in PCI bus order, which is NVML's, only when told to (its
        # default puts the fastest GPU first). Set before the stage initialises CUDA.
        os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
        # By name: the worker's code runs in the actor's process, and the coordinator
        # does not import the worker package (docs/architecture.md: roles do not import each other).
        server = importlib.import_module("worker.server")
        options = importlib.import_module("worker.options")
        host = host or ray.util.get_node_ip_address()
        if self._worker is None:
            self._worker = await server.start_worker(options.WorkerOptions(
                listen=f"{host}:0", token=token, tls=tls, name=name))
        return {"address": f"{host}:{self._worker.port}", "pid": os.getpid(),
                "node_id": ray.get_runtime_context().get_node_id(),
                "gpu_ids": [str(g) for g in ray.get_gpu_ids()]}

    async def sentinel(self) -> None:
        """Never returns: it fails when the actor's process dies."""
        await asyncio.Event().wait()

    async def stop(self) -> None:
        if self._worker is not None:
            await self._worker.stop()
            self._worker = None


@dataclass
class _Member:
    actor: ray.actor.ActorHandle
    address: str = ""
    pid: int | None = None
    node_id: str = ""
    gpu_ids: list[str] = field(default_factory=list)  # as Ray assigned them on the node
    sentinel: ray.ObjectRef | None = None


def ring_order(bundle_nodes: list[str]) -> list[int]:
    """Bundle indices in ring order: the bundles of one node next to each other (nodes in
    the order of their first bundle), so the ring crosses the network once per node."""
    first: dict[str, int] = {}
    for i, node in enumerate(bundle_nodes):
        first.setdefault(node, i)
    return sorted(range(len(bundle_nodes)), key=lambda i: (first[bundle_nodes[i]], i))


class RayWorkers:
    """N worker actors, one per bundle of a placement group, in ring order."""

    def __init__(self, n: int | None = None, address: str | None = None,
                 tls: TlsFiles | None = None, token: str | None = None,
                 local: bool = False) -> None:
        self.requested, self.ray_address, self.local = n, address, local
        self.tls = tls
        # Always a token: actors bind their node's address, reachable from the LAN.
        self.token: str | None = token or new_token()
        self.addresses: list[str] = []
        self.members: list[_Member] = []
        self._pg: PlacementGroup | None = None
        self._started_ray = False

    # --- placement ---------------------------------------------------------------------

    def start(self) -> RayWorkers:
        try:
            self._connect_ray()
            self._place()
            for i in range(len(self.members)):
                self._start_member(i)
        except BaseException:
            self.stop()
            raise
        return self

    def _connect_ray(self) -> None:
        if ray.is_initialized():
            return
        env = {"env_vars": dict(SPIN_POLICY)}
        if self.local:
            cpus = max(self.requested or 1, os.cpu_count() or 1)
            ray.init(num_cpus=cpus, include_dashboard=False, runtime_env=env,
                     logging_level=logging.WARNING, log_to_driver=False)
        else:
            ray.init(address=self.ray_address or "auto", runtime_env=env,
                     logging_level=logging.WARNING, log_to_driver=False)
        self._started_ray = True

    def _bundles(self) -> tuple[list[dict[str, float]], str, bool]:
        """One GPU bundle per GPU of the cluster (or per worker asked for), packed onto as
        few nodes as hold them; without GPUs, one CPU bundle per node."""
        nodes = [n for n in ray.nodes() if n["Alive"]]
        if self.local:
            return [{"CPU": 1}] * (self.requested or 2), "PACK", False
        n_gpus = sum(int(n["Resources"].get("GPU", 0)) for n in nodes)
        if n_gpus:
            return [{"GPU": 1, "CPU": 1}] * (self.requested or n_gpus), "PACK", True
        n = self.requested or len(nodes)
        return [{"CPU": 1}] * n, "STRICT_SPREAD", False

    def _place(self) -> None:
        bundles, strategy, gpu = self._bundles()
        self._pg = placement_group(bundles, strategy=strategy)
        if not self._pg.wait(timeout_seconds=60):
            raise SpecshardError(
                f"Ray cannot place {len(bundles)} workers ({strategy} over "
                f"{'GPU' if gpu else 'CPU'} bundles): add nodes or ask for fewer workers")
        # Ray may number bundles across nodes (0 and 2 on one, 1 on another): the ring
        # follows the nodes instead, each node's workers adjacent.
        table = placement_group_table(self._pg)["bundles_to_node_id"]
        order = ring_order([str(table[i]) for i in range(len(bundles))])
        actor_class: Any = WorkerActor
        self.members = [_Member(actor_class.options(
            num_cpus=1, num_gpus=1 if gpu else 0, name=None,
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                placement_group=self._pg, placement_group_bundle_index=i),
        ).remote()) for i in order]

    def _start_member(self, i: int) -> str:
        m = self.members[i]
        host = "127.0.0.1" if self.local else None
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            ref = m.actor.start.remote(host, self.token, self.tls, f"worker-{i}")
            try:
                info = ray.get(ref, timeout=max(deadline - time.monotonic(), 1))
                break
            except ray.exceptions.ActorUnavailableError:  # Ray is restarting it
                if time.monotonic() > deadline:
                    raise SpecshardError(f"worker {i} did not come back") from None
                time.sleep(0.5)
            except ray.exceptions.GetTimeoutError:
                raise SpecshardError(
                    f"worker {i} did not start within {START_TIMEOUT_S:.0f} s") from None
        m.address, m.pid, m.node_id = str(info["address"]), int(info["pid"]), \
            str(info["node_id"])
        m.gpu_ids = list(info["gpu_ids"])
        m.sentinel = m.actor.sentinel.remote()
        if i < len(self.addresses):
            self.addresses[i] = m.address
        else:
            self.addresses.append(m.address)
        log.info("worker %d at %s (pid %d, GPU %s)", i, m.address, m.pid,
                 ",".join(m.gpu_ids) or "none")
        return m.address

    # --- the WorkerSet protocol ----------------------------------------------------------

    def dead(self) -> list[int]:
        refs = [m.sentinel for m in self.members if m.sentinel is not None]
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        gone = {ref.hex() for ref in done}
        return [i for i, m in enumerate(self.members)
                if m.sentinel is not None and m.sentinel.hex() in gone]

    def restart(self, i: int) -> str:
        """Ray brings the actor back (same bundle); start its worker again."""
        self.members[i].sentinel = None
        return self._start_member(i)

    def pids(self) -> list[int | None]:
        return [m.pid for m in self.members]

    def node_ids(self) -> list[str]:
        return [m.node_id for m in self.members]

    def gpu_ids(self) -> list[list[str]]:
        """Each worker's GPU, as Ray numbers the GPUs of its node (empty on a CPU)."""
        return [m.gpu_ids for m in self.members]

    def stop(self) -> None:
        for m in self.members:
            try:
                ray.kill(m.actor, no_restart=True)
            except Exception:  # already gone
                log.debug("actor already gone", exc_info=True)
        self.members = []
        if self._started_ray:
            # Our own Ray goes whole, placement group and all. Not removing the group
            # first matters when a signal reached the whole process group (Ctrl-C, or
            # kill on the group): Ray's GCS is gone already and the removal would wait
            # 60 s for it.
            ray.shutdown()
            self._started_ray = False
        elif self._pg is not None:
            remove_placement_group(self._pg)
        self._pg = None
