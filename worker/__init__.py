"""Runs on GPU boxes: one process per GPU, serving one pipeline stage."""

import cluster  # noqa: F401 — before grpc: gRPC's fork policy (cluster/__init__.py)
