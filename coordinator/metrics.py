"""Prometheus metrics of the serving coordinator (`GET /metrics`).

Every metric here is set by the engine or the API as it runs (tests/test_serve.py reads
them back): none is declared for show.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

if TYPE_CHECKING:
    from coordinator.engine.sequence import Stats

_MS = (0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)
_S = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300)
_ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


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
        self.stage_ms = Histogram("specshard_stage_ms", "Compute time per batch, per worker",
                                  ["worker"], buckets=_MS, registry=r)
        self.hop_ms = Histogram("specshard_hop_ms",
                                "Batch time not spent computing, per hop of the ring",
                                buckets=_MS, registry=r)
        self.draft_ms = Histogram("specshard_draft_ms", "Time to draft one micro-batch",
                                  buckets=_MS, registry=r)
        self.windows = Counter("specshard_windows", "Judged windows sent: a chain's first "
                               "(after a verdict) or run ahead of a verdict", ["kind"],
                               registry=r)
        self.stale_windows = Counter("specshard_windows_stale", "Run-ahead windows whose "
                                     "verdict was dropped: a verdict before them broke "
                                     "their chain", registry=r)
        self.skipped_windows = Counter("specshard_windows_skipped", "Stale run-ahead "
                                       "windows the last worker did not compute (it had "
                                       "broken their chain itself)", registry=r)
        self.ttft_s = Histogram("specshard_time_to_first_token_seconds",
                                "Arrival to first token", buckets=_S, registry=r)
        self.batch_rows = Histogram("specshard_batch_rows", "Rows per micro-batch",
                                    buckets=_ROWS, registry=r)
        self.batch_decode_rows = Histogram("specshard_batch_decode_rows",
                                           "Rows of decoding sequences per micro-batch "
                                           "(their tokens and draft guesses)",
                                           buckets=_ROWS, registry=r)
        self.batch_decode_passes = Histogram(
            "specshard_batch_decode_passes", "Passes over a stage's weights the decode rows "
            "of a micro-batch take: one per row count and run of consecutive slots "
            "(docs/scheduler.md, Lanes)", buckets=(1, 2, 3, 4, 6, 8, 16), registry=r)
        self.queue_depth = Gauge("specshard_queue_depth", "Requests waiting for a sequence",
                                 registry=r)
        self.running = Gauge("specshard_sequences_running", "Sequences being decoded",
                             registry=r)
        self.slots_free = Gauge("specshard_sequence_slots_free",
                                "Sequence slots free in every stage", registry=r)
        self.kv_tokens = Gauge("specshard_kv_tokens",
                               "Positions held in the KV caches (every stage holds the "
                               "same positions, each for its own layers)", registry=r)
        self.kv_cached_tokens = Gauge("specshard_kv_cached_tokens",
                                      "Positions idle slots keep for prompt reuse",
                                      registry=r)
        self.prompt_tokens_reused = Counter("specshard_prompt_tokens_reused",
                                            "Prompt tokens found in a slot's caches",
                                            registry=r)
        self.prompt_tokens_computed = Counter("specshard_prompt_tokens_computed",
                                              "Prompt tokens computed by the ring",
                                              registry=r)
        self.prompt_tokens_copied = Counter("specshard_prompt_tokens_copied",
                                            "Prompt tokens copied from another slot on "
                                            "every stage (a shared prefix; also counted "
                                            "as reused)", registry=r)
        self.cache_moves = Counter("specshard_cache_moves",
                                   "Idle slots' caches moved to another slot on every "
                                   "stage, to keep decoding sequences in consecutive "
                                   "slots", registry=r)
        self.restarts = Counter("specshard_worker_restarts",
                                "Ring rebuilds after a lost worker", registry=r)
        self.requests = Counter("specshard_requests", "Requests by outcome", ["outcome"],
                                registry=r)
        # By cause: "client" (the request's own values, HTTP 400) or "cluster" (a worker
        # or the ring failed it: HTTP 500/503, a client may retry).
        self.requests_failed = Counter("specshard_engine_failures",
                                       "Requests the engine could not complete, by cause",
                                       ["cause"], registry=r)
        self.ring_state = Gauge("specshard_ring_state", "1 for the engine's current state "
                                "(running, recovering, down)", ["state"], registry=r)

    def observe_stats(self, stats: Stats) -> None:
        self.tok_s.set(stats.tok_s)
        self.tokens_per_step.set(stats.tokens_per_step)
        for k, (a, p) in enumerate(zip(stats.accepted, stats.proposed, strict=True), start=1):
            if p:
                self.acceptance.labels(position=str(k)).set(a / p)

    def render(self) -> bytes:
        return generate_latest(self.registry)
