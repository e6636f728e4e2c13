"""Prometheus metrics of the serving coordinator (`GET /metrics`)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from coordinator.generate import Stats

_MS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.tokens_in = Counter("specshard_prompt_tokens", "Prompt tokens received",
                                 registry=r)
        self.tokens_out = Counter("specshard_generated_tokens", "Tokens generated", registry=r)
        self.tok_s = Gauge("specshard_decode_tokens_per_second",
                           "Decode rate of the last finished request", registry=r)
        self.tokens_per_step = Gauge("specshard_tokens_per_step",
                                     "Tokens per pipeline step, last finished request",
                                     registry=r)
        self.acceptance = Gauge("specshard_draft_acceptance",
                                "Fraction of draft guesses accepted, by draft position",
                                ["position"], registry=r)
        self.stage_ms = Histogram("specshard_stage_ms", "Compute time per step, per worker",
                                  ["worker"], buckets=_MS, registry=r)
        self.hop_ms = Histogram("specshard_hop_ms",
                                "Step time not spent computing, per hop of the ring",
                                buckets=_MS, registry=r)
        self.queue_depth = Gauge("specshard_queue_depth", "Requests waiting for a sequence",
                                 registry=r)
        self.kv_tokens = Gauge("specshard_kv_tokens", "Tokens held in KV caches, per node",
                               ["node"], registry=r)
        self.restarts = Counter("specshard_worker_restarts",
                                "Workers restarted or re-placed after a failure", registry=r)
        self.requests = Counter("specshard_requests", "Requests by outcome", ["outcome"],
                                registry=r)

    def observe_stats(self, stats: Stats) -> None:
        self.tok_s.set(stats.tok_s)
        self.tokens_per_step.set(stats.tokens_per_step)
        for k, (a, p) in enumerate(zip(stats.accepted, stats.proposed, strict=True), start=1):
            if p:
                self.acceptance.labels(position=str(k)).set(a / p)

    def render(self) -> bytes:
        return generate_latest(self.registry)
