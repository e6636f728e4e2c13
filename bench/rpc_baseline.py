"""llama.cpp itself, the baseline we are compared with (docs/architecture.md,
"Numbers"): one process, or its RPC mode with every layer on rpc-servers.

`start_rpc_servers` runs N rpc-servers (bench/rpc_server_child.py), one per core, the way
our workers are pinned. `run_llama` loads the model in a fresh process (over the servers
when given endpoints, as `llama-cli --rpc` would) and runs workloads there:

- `Prefill`: one prompt fed in n_batch-sized `llama_decode` calls; time to first token.
- `Decode`: one sequence, greedy, one token per `llama_decode`, measured the way
  coordinator/engine/generate.py does: (tokens − 1) ÷ (first → last generated token).
- `Batched`: S sequences (seq ids 0..S−1) prefilled one after the other, then every
  decode step is ONE `llama_decode` with one row per sequence, as llama-server batches
  its slots; KV unified across sequences, llama-server's default when it runs several
  slots (tools/server/server.cpp: n_parallel auto → 4 slots and kv_unified = true).

`rpc_decode_tok_s` is `Decode` with bench/pipeline.py's keys. The process itself is
bench/llama_baseline.py (`python -m bench.llama_baseline REQUEST RESULT`, JSON files).
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cluster.gguf_file import read_header
from cluster.model_info import model_info
from coordinator.placement.local import worker_env

START_TIMEOUT_S = 30.0
STOP_GRACE_S = 5.0
RUN_TIMEOUT_S = 900.0  # loading sends every weight over the socket: seconds per GB
_ROOT = Path(__file__).resolve().parent.parent  # children run `-m bench.…` from here
_BUFFER_LINE = re.compile(r"(\S+) model buffer size =\s*([\d.]+) MiB")


@dataclass
class RpcServers:
    """Running rpc-servers; a context manager that stops them however the block ends."""

    endpoints: list[str]
    procs: list[subprocess.Popen[bytes]]
    log_dir: tempfile.TemporaryDirectory[str] = field(repr=False)

    def log(self, i: int) -> str:
        return (Path(self.log_dir.name) / f"rpc{i}.log").read_text(errors="replace")

    def stop(self) -> None:
        stop_processes(self.procs)
        self.log_dir.cleanup()

    def __enter__(self) -> RpcServers:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()


def stop_processes(procs: Sequence[subprocess.Popen[bytes]]) -> None:
    """SIGTERM, then SIGKILL whatever still runs after STOP_GRACE_S."""
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    deadline = time.monotonic() + STOP_GRACE_S
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def free_ports(n: int) -> list[int]:
    """n distinct free loopback ports (all held open while choosing, so none repeats).

    llama.cpp's server cannot bind port 0 and report it, so there is a small window in
    which another process could take the port; the child then exits and we say so.
    """
    socks = [socket.socket() for _ in range(n)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def wait_listening(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace").strip().splitlines()[-3:]
            raise RuntimeError(f"rpc-server on port {port} exited: {' | '.join(tail)}")
        try:
            # The server takes one client at a time; this probe is dropped at once.
            socket.create_connection(("127.0.0.1", port), timeout=1.0).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"rpc-server on port {port} not listening after {START_TIMEOUT_S:.0f} s")


def start_rpc_servers(n: int, threads: int = 1, cpus: list[int] | None = None) -> RpcServers:
    """Start n rpc-servers, server i pinned to core cpus[i % len(cpus)] (default: our cores).

    GOMP_SPINCOUNT comes from the worker spin policy unless the caller's env sets it, so
    both systems idle their OpenMP threads alike.
    """
    cores = cpus or sorted(os.sched_getaffinity(0))
    log_dir = tempfile.TemporaryDirectory(prefix="specshard-rpc-")
    servers = RpcServers([], [], log_dir)
    try:
        for i, port in enumerate(free_ports(n)):
            log = Path(log_dir.name) / f"rpc{i}.log"
            cmd = [sys.executable, "-m", "bench.rpc_server_child",
                   "--endpoint", f"127.0.0.1:{port}", "--threads", str(threads),
                   "--pin", str(cores[i % len(cores)])]
            with open(log, "wb") as out:  # the child keeps its own copy of the descriptor
                servers.procs.append(subprocess.Popen(
                    cmd, stdout=out, stderr=subprocess.STDOUT, env=worker_env(), cwd=_ROOT))
            servers.endpoints.append(f"127.0.0.1:{port}")
        for i, endpoint in enumerate(servers.endpoints):
            port = int(endpoint.rsplit(":", 1)[1])
            wait_listening(port, servers.procs[i], Path(log_dir.name) / f"rpc{i}.log")
    except BaseException:
        servers.stop()
        raise
    return servers


def layer_weights(n_layer: int, n_devices: int) -> list[float]:
    """tensor_split giving device i the blocks of our even split, the output on the last.

    llama.cpp puts slot il (0..n_layer, n_layer = output) on the first device whose
    cumulative share exceeds il / (n_layer + 1); share boundaries half a slot below each
    cut keep float rounding away from the decision.
    """
    cuts = [round(i * n_layer / n_devices) for i in range(1, n_devices)]
    bounds = [(cut - 0.5) / (n_layer + 1) for cut in cuts] + [1.0]
    return [b - a for a, b in zip([0.0, *bounds[:-1]], bounds, strict=True)]


@dataclass(frozen=True)
class _Workload:
    # kw_only: after each workload's own positional fields. llama-server defaults to
    # -b 2048 -ub 512 (common/common.h); 512 for both makes each llama_decode call of a
    # prefill one ubatch, the unit the ttft is measured in.
    n_batch: int = field(default=512, kw_only=True)
    n_ubatch: int = field(default=512, kw_only=True)
    margins: bool = field(default=False, kw_only=True)  # top-2 logit gap per token; slower


@dataclass(frozen=True)
class Prefill(_Workload):
    prompt: list[int]


@dataclass(frozen=True)
class Decode(_Workload):
    prompt: list[int]
    n_tokens: int  # generated, the one the prefill computes included

    def __post_init__(self) -> None:
        if self.n_tokens < 1:
            raise ValueError("n_tokens counts the prefill's token: at least 1")


@dataclass(frozen=True)
class Batched(_Workload):
    prompts: list[list[int]]  # sequence i is prompts[i]
    n_tokens: int  # per sequence, the one its prefill computes included
    kv_unified: bool = True

    def __post_init__(self) -> None:
        if not 1 <= len(self.prompts) <= self.n_batch:  # a step holds a row per sequence
            raise ValueError(f"1..n_batch sequences, not {len(self.prompts)}")
        if self.n_tokens < 1:
            raise ValueError("n_tokens counts the prefill's token: at least 1")


Workload = Prefill | Decode | Batched
WORKLOADS: dict[str, type[Prefill] | type[Decode] | type[Batched]] = {
    "prefill": Prefill, "decode": Decode, "batched": Batched}


def run_llama(model_path: Path, workloads: Sequence[Workload], endpoints: Sequence[str] = (),
              threads: int = 1, cpus: list[int] | None = None) -> dict[str, Any]:
    """Load the model once in a fresh process pinned to `cpus`; run `workloads` in order.

    A fresh process because llama.cpp's RPC registry is process-global and never forgets
    a server, and pinning must precede its threads. With no endpoints it is a plain
    single-process CPU run, the reference the RPC tokens must equal. Each workload gets
    its own context. Returns {"results": one dict per workload (bench/llama_baseline.py
    `run_workload`), "model_buffers_mib": llama.cpp's report of where the weights went}.
    """
    kinds = {cls: kind for kind, cls in WORKLOADS.items()}
    request = {"model": str(model_path), "endpoints": list(endpoints), "threads": threads,
               "cpus": cpus, "n_layer": model_info(read_header(Path(model_path))).n_layer,
               "workloads": [{"kind": kinds[type(w)], **asdict(w)} for w in workloads]}
    with tempfile.TemporaryDirectory(prefix="specshard-llama-") as tmp:
        req, res, log = (Path(tmp) / name for name in ("request.json", "result.json", "log"))
        req.write_text(json.dumps(request))
        cmd = [sys.executable, "-m", "bench.llama_baseline", str(req), str(res)]
        with open(log, "wb") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                    env=worker_env(), cwd=_ROOT)
            try:
                proc.wait(timeout=RUN_TIMEOUT_S)
            finally:  # also on a timeout or an interrupt
                stop_processes([proc])
        text = log.read_text(errors="replace")
        if proc.returncode != 0 or not res.exists():
            tail = " | ".join(text.strip().splitlines()[-5:])
            raise RuntimeError(f"llama.cpp process failed ({proc.returncode}): {tail}")
        results: list[dict[str, Any]] = json.loads(res.read_text())
    return {"results": results,
            "model_buffers_mib": {m[1]: float(m[2]) for m in _BUFFER_LINE.finditer(text)}}


def rpc_decode_tok_s(model_path: Path, endpoints: list[str], prompt_tokens: list[int],
                     n_tokens: int, threads_main: int = 1,
                     cpus: list[int] | None = None) -> dict[str, Any]:
    """Greedy-decode n_tokens with every layer on the rpc-servers at `endpoints` (none:
    one process). Returns rpc_tok_s, prompt_tok_s, tokens and model_buffers_mib."""
    out = run_llama(model_path, [Decode(prompt_tokens, n_tokens)], endpoints,
                    threads_main, cpus)
    result = out["results"][0]
    return {"rpc_tok_s": result["decode_tok_s"], "prompt_tok_s": result["prompt_tok_s"],
            "tokens": result["tokens"], "model_buffers_mib": out["model_buffers_mib"]}


def first_difference(reference: list[int], other: list[int],
                     margins: list[float]) -> dict[str, Any] | None:
    """Where `other` first leaves `reference`, with reference's top-2 logit gap there.

    llama.cpp's kernels are not batch-invariant: another batch shape may flip a near
    tie, and the gap (`margins` of the reference run) says whether a difference is one.
    """
    for i, (a, b) in enumerate(zip(reference, other, strict=False)):
        if a != b:
            return {"index": i, "reference": a, "other": b,
                    "gap": margins[i] if margins else None}
    if len(reference) != len(other):
        return {"index": min(len(reference), len(other)), "reference": None, "other": None,
                "gap": None}
    return None
