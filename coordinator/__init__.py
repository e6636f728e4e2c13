"""Runs on the Ray driver: tokenizer, draft model, the decode loop, the HTTP API."""

import cluster  # noqa: F401 — before grpc: gRPC's fork policy (cluster/__init__.py)
