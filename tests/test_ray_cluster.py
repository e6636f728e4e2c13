"""Ray places one worker per (simulated) GPU, a node's workers adjacent in the ring, and
the ring runs as planned."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray
from ray.cluster_utils import Cluster

from coordinator.engine.request import GenerationRequest
from coordinator.placement.ray_actors import RayWorkers, ring_order
from coordinator.ring.builder import BuiltRing, build_ring
from coordinator.ring.grpc_ring import GrpcRing
from coordinator.service import start_engine
from coordinator.speculation.gamma import FREE_DRAFT
from coordinator.tokenizer import Tokenizer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gpu_nodes() -> Iterator[Cluster]:
    """A box with two GPUs (the head) and a box with one: logical GPUs, as Ray sees them."""
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "num_gpus": 2, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1, num_gpus=1)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, logging_level=logging.WARNING, log_to_driver=False)
        yield cluster
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()


def test_ring_order_keeps_a_node_s_bundles_together():
    assert ring_order(["a", "b", "a"]) == [0, 2, 1]
    assert ring_order(["b", "a", "a", "b", "c"]) == [0, 3, 1, 2, 4]
    assert ring_order([]) == []


def test_one_worker_per_gpu_a_node_s_workers_adjacent(gpu_nodes: Cluster):
    workers = RayWorkers(address=gpu_nodes.address)
    try:
        workers.start()
        assert len(workers.addresses) == 3  # one per GPU, none asked for explicitly
        node_ids = workers.node_ids()
        assert gpu_nodes.head_node is not None
        head = gpu_nodes.head_node.node_id
        assert node_ids.count(head) == 2 and len(set(node_ids)) == 2  # every GPU is used
        # The head's two workers neighbour in the ring: one network hop between the nodes.
        assert node_ids[1] == head and head in (node_ids[0], node_ids[2])
        # Each worker got a GPU of its own from Ray (CUDA_VISIBLE_DEVICES in its process).
        on_head = [g for n, g in zip(node_ids, workers.gpu_ids(), strict=True) if n == head]
        elsewhere = [g for n, g in zip(node_ids, workers.gpu_ids(), strict=True) if n != head]
        assert sorted(on_head) == [["0"], ["1"]] and elsewhere == [["0"]]
    finally:
        workers.stop()


def twelve_tokens(built: BuiltRing, tokenizer: Tokenizer, prompt: list[int]) -> list[int]:
    engine = start_engine(built, tokenizer, "test", costs=FREE_DRAFT)
    try:
        return engine.generate(GenerationRequest(prompt, 12, ignore_eos=True)).tokens
    finally:
        engine.close()


def test_the_ring_runs_as_planned_on_them(gpu_nodes: Cluster, demo_target: Path):
    workers = RayWorkers(address=gpu_nodes.address)
    built = None
    try:
        workers.start()
        built = build_ring(demo_target, workers=workers, ctx=512)
        plan = built.plan
        assert plan is not None and plan.feasible
        planned = [(s.begin, s.end) for s in plan.stages]
        assert planned[0][0] == 0 and planned[-1][1] == 28 and len(planned) == 3
        assert isinstance(built.ring, GrpcRing)
        loaded = [(i.stage.begin, i.stage.end) for i in built.ring.node_infos() if i.stage]
        assert loaded == planned  # worker i holds the planned stage i
        tokenizer = Tokenizer(demo_target)
        prompt = tokenizer.encode(tokenizer.chat_prompt(
            [{"role": "user", "content": "Write a haiku about rings."}]))
        got = twelve_tokens(built, tokenizer, prompt)
        local = build_ring(demo_target, stages=1, ctx=512)
        try:
            want = twelve_tokens(local, tokenizer, prompt)
        finally:
            local.close()
        assert got == want
    finally:
        if built is not None:
            built.close()  # stops the workers too
        else:
            workers.stop()
