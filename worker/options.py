"""How a worker process listens and whom it trusts."""

from __future__ import annotations

from dataclasses import dataclass

from cluster.auth import TlsFiles


@dataclass(frozen=True)
class WorkerOptions:
    listen: str = "127.0.0.1:0"
    token: str | None = None
    tls: TlsFiles | None = None
    name: str = ""
