"""`specshard worker`: serve one stage over gRPC."""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import signal
from pathlib import Path

from cluster.auth import read_token, tls_from_args
from cluster.errors import SpecshardError
from cluster.hardware import GpuInfo, gpus
from worker.options import WorkerOptions

log = logging.getLogger(__name__)


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
    p.add_argument("--gpu", type=int, metavar="N",
                   help="use only GPU N (nvidia-smi's numbering): one worker per GPU")
    p.add_argument("--parent-pid", type=int, help=argparse.SUPPRESS)  # LocalWorkers
    p.set_defaults(handler=run)


def die_with_parent(parent: int) -> None:
    """SIGTERM this worker when the process that started it dies, so no local worker
    outlives a killed run. (Linux sends it when the *thread* that started the worker
    ends: start workers from threads that live as long as they should.) Set here, not
    in a `preexec_fn`: that makes Python fork instead of vfork, and a forked copy of a
    process using gRPC can crash before its exec (gRPC restarts its poller in the child,
    on an epoll fd Popen just closed: grpc/grpc#43157)."""
    PR_SET_PDEATHSIG = 1  # linux/prctl.h
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # it died before the line above
        raise SystemExit(f"the process that started this worker ({parent}) is gone")


def check_gpu(index: int, found: list[GpuInfo], error: str) -> GpuInfo:
    """The GPU `--gpu index` names among this machine's, or why there is none."""
    if not found:
        raise SpecshardError(f"--gpu {index}: no NVIDIA GPU on this machine "
                             f"({error or 'NVML lists none'})")
    for gpu in found:
        if gpu.index == index:
            return gpu
    listing = ", ".join(f"{g.index} ({g.name})" for g in found)
    raise SpecshardError(f"--gpu {index}: no such GPU; this machine has {listing}")


def use_gpu(index: int) -> None:
    """Show this process GPU `index` only. llama.cpp spreads a model over every GPU it
    sees (split mode "layer" is its default), and a stage belongs on one GPU."""
    gpu = check_gpu(index, *gpus(None))
    # PCI bus order makes CUDA's device numbers nvidia-smi's (and NVML's), which is how
    # `index` was checked and how cluster.hardware reads the variable back.
    os.environ["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    os.environ["CUDA_VISIBLE_DEVICES"] = str(index)
    log.info("using GPU %d (%s) only", index, gpu.name)


def run(args: argparse.Namespace) -> int:
    if args.parent_pid is not None:
        die_with_parent(args.parent_pid)
    if args.gpu is not None:
        use_gpu(args.gpu)
    if args.pin is not None:
        os.sched_setaffinity(0, {args.pin})
    # Imported after use_gpu: CUDA reads CUDA_VISIBLE_DEVICES once, when llama.cpp first
    # lists its devices (llama_backend_init → ggml_backend_reg_count → ggml_cuda_init).
    # Importing llama_cpp does not do that today; nothing in the worker's import chain
    # gets the chance to start doing it first.
    from worker.server import run_worker

    token = read_token(args.token_file) if args.token_file else None
    options = WorkerOptions(listen=args.listen, token=token,
                            tls=tls_from_args(args.tls_cert, args.tls_key, args.tls_ca),
                            name=args.name)
    run_worker(options, args.port_file)
    return 0
