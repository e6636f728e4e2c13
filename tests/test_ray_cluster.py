"""Ray places one worker per (simulated) GPU node, and the ring runs as planned."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import ray
from ray.cluster_utils import Cluster

from cluster.sampling import SamplingParams
from cluster.stage_cut import even_split
from coordinator.generate import generate
from coordinator.local_pipeline import LocalPipeline
from coordinator.metrics import Metrics
from coordinator.ray_workers import RayWorkers
from coordinator.ring import Ring
from coordinator.tokenizer import Tokenizer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def three_nodes() -> Iterator[Cluster]:
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "num_gpus": 1, "include_dashboard": False})
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=1, num_gpus=1)
        cluster.wait_for_nodes()
        yield cluster
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()


def test_one_worker_per_gpu_node_placed_as_planned(three_nodes: Cluster, demo_target: Path):
    ray.init(address=three_nodes.address, logging_level="WARNING", log_to_driver=False)
    workers = RayWorkers(address=three_nodes.address)
    ring = None
    try:
        workers.start()
        assert len(workers.addresses) == 3  # one per GPU node, none asked for explicitly
        node_ids = workers.node_ids()
        assert len(set(node_ids)) == 3
        alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        assert set(node_ids) == alive
        ring = Ring(workers, demo_target, str(demo_target), 512, 1, 1, Metrics())
        pipeline = ring.start()
        assert ring.plan is not None and ring.plan.feasible
        planned = [(s.begin, s.end) for s in ring.plan.stages]
        assert planned[0][0] == 0 and planned[-1][1] == 28 and len(planned) == 3
        loaded = [(i.stage.begin, i.stage.end) for i in pipeline.node_infos() if i.stage]
        assert loaded == planned  # worker i (on node i) holds the planned stage i
        tokenizer = Tokenizer(demo_target)
        prompt = tokenizer.encode(tokenizer.chat_prompt(
            [{"role": "user", "content": "Write a haiku about rings."}]))
        got = generate(pipeline, prompt, 12, SamplingParams(), lambda _t: False).tokens
        local = LocalPipeline.load(demo_target, even_split(28, 1), n_ctx=512)
        try:
            want = generate(local, prompt, 12, SamplingParams(), lambda _t: False).tokens
        finally:
            local.close()
        assert got == want
    finally:
        if ring is not None:
            ring.close()
        workers.stop()
