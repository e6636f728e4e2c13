"""`specshard worker`: serve one stage over gRPC."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from cluster.auth import read_token, tls_from_args
from worker.server import WorkerOptions, run_worker


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("worker", help="run a gRPC worker that serves one stage")
    p.add_argument("--listen", default="127.0.0.1:50051",
                   help="HOST:PORT to bind (default loopback; port 0 = any free port)")
    p.add_argument("--token-file", help="file holding the cluster token (required beyond "
                                        "loopback)")
    p.add_argument("--tls-cert", help="this worker's certificate (PEM)")
    p.add_argument("--tls-key", help="its private key (PEM)")
    p.add_argument("--tls-ca", help="CA that signs peers' certificates: mutual TLS")
    p.add_argument("--name", default="", help="name in logs and errors (default host:port)")
    p.add_argument("--port-file", type=Path, help="write the bound port here once listening")
    p.add_argument("--pin", type=int, metavar="CORE", help="run on this CPU core only")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    if args.pin is not None:
        os.sched_setaffinity(0, {args.pin})
    token = read_token(args.token_file) if args.token_file else None
    options = WorkerOptions(listen=args.listen, token=token,
                            tls=tls_from_args(args.tls_cert, args.tls_key, args.tls_ca),
                            name=args.name)
    run_worker(options, args.port_file)
    return 0
