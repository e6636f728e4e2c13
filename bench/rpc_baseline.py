"""llama.cpp's own RPC mode, the baseline our gRPC pipeline is compared with (ANCHORS.md).

`start_rpc_servers` runs N rpc-servers (bench/rpc_server_child.py), one per core, the way
our workers are pinned; `rpc_decode_tok_s` loads the model over them in a fresh process,
as `llama-cli --rpc` would, and measures greedy decode the way coordinator/generate.py
does: (tokens − 1) ÷ (first generated token → last generated token).

The decode process runs `python -m bench.rpc_baseline REQUEST RESULT` (JSON files).
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np

from bench.rpc_server_child import LIB_DIR
from cluster.gguf_file import read_header
from cluster.model_info import model_info
from coordinator.launcher import worker_env

START_TIMEOUT_S = 30.0
STOP_GRACE_S = 5.0
DECODE_TIMEOUT_S = 900.0  # loading sends every weight over the socket: seconds per GB
LLAMA_SPLIT_MODE_LAYER = 1  # llama.h: enum llama_split_mode
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


def stop_processes(procs: list[subprocess.Popen[bytes]]) -> None:
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


def rpc_decode_tok_s(model_path: Path, endpoints: list[str], prompt_tokens: list[int],
                     n_tokens: int, threads_main: int = 1,
                     cpus: list[int] | None = None) -> dict[str, Any]:
    """Greedy-decode n_tokens with every layer on the rpc-servers at `endpoints`.

    Runs in a fresh process pinned to `cpus` (llama.cpp's RPC registry is process-global
    and never forgets a server). With no endpoints it is a plain single-process CPU run:
    the reference the RPC tokens must equal. Returns rpc_tok_s, prompt_tok_s, tokens and
    model_buffers_mib (llama.cpp's own report of where the weights went).
    """
    request = {"model": str(model_path), "endpoints": endpoints, "prompt": prompt_tokens,
               "n_tokens": n_tokens, "threads": threads_main, "cpus": cpus,
               "n_layer": model_info(read_header(Path(model_path))).n_layer}
    with tempfile.TemporaryDirectory(prefix="specshard-rpc-decode-") as tmp:
        req, res, log = (Path(tmp) / name for name in ("request.json", "result.json", "log"))
        req.write_text(json.dumps(request))
        cmd = [sys.executable, "-m", "bench.rpc_baseline", str(req), str(res)]
        with open(log, "wb") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                    env=worker_env(), cwd=_ROOT)
            try:
                proc.wait(timeout=DECODE_TIMEOUT_S)
            finally:
                stop_processes([proc])
        text = log.read_text(errors="replace")
        if proc.returncode != 0 or not res.exists():
            tail = " | ".join(text.strip().splitlines()[-5:])
            raise RuntimeError(f"decode process failed ({proc.returncode}): {tail}")
        result: dict[str, Any] = json.loads(res.read_text())
    result["model_buffers_mib"] = {m[1]: float(m[2]) for m in _BUFFER_LINE.finditer(text)}
    return result


# --- the decode process --------------------------------------------------------------


def _ggml() -> ctypes.CDLL:
    ggml = ctypes.CDLL(str(LIB_DIR / "libggml.so"))
    ggml.ggml_backend_reg_by_name.argtypes = [ctypes.c_char_p]
    ggml.ggml_backend_reg_by_name.restype = ctypes.c_void_p
    ggml.ggml_backend_register.argtypes = [ctypes.c_void_p]
    ggml.ggml_backend_register.restype = None
    ggml.ggml_backend_reg_get_proc_address.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    ggml.ggml_backend_reg_get_proc_address.restype = ctypes.c_void_p
    ggml.ggml_backend_reg_dev_count.argtypes = [ctypes.c_void_p]
    ggml.ggml_backend_reg_dev_count.restype = ctypes.c_size_t
    ggml.ggml_backend_reg_dev_get.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    ggml.ggml_backend_reg_dev_get.restype = ctypes.c_void_p
    return ggml


def rpc_devices(endpoints: list[str]) -> list[int]:
    """Register the servers as common/arg.cpp's `--rpc` does; return their devices."""
    ggml = _ggml()
    rpc_reg = ggml.ggml_backend_reg_by_name(b"RPC")
    address = ggml.ggml_backend_reg_get_proc_address(rpc_reg, b"ggml_backend_rpc_add_server")
    if not rpc_reg or not address:
        raise RuntimeError("this llama.cpp build has no RPC backend")
    add_server = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_char_p)(address)
    devices = []
    for endpoint in endpoints:
        reg = add_server(endpoint.encode())
        if not reg:
            raise RuntimeError(f"rpc-server {endpoint} reports no devices")
        ggml.ggml_backend_register(reg)
        devices += [ggml.ggml_backend_reg_dev_get(reg, i)
                    for i in range(ggml.ggml_backend_reg_dev_count(reg))]
    return devices


def greedy_decode(ctx: Any, model: Any, prompt: list[int], n_tokens: int) -> dict[str, Any]:
    n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))

    def step(tokens: list[int]) -> int:
        array = (llama_cpp.llama_token * len(tokens))(*tokens)
        if llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(array, len(tokens))):
            raise RuntimeError("llama_decode failed")
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, -1), (n_vocab,))
        return int(np.argmax(logits))

    t0 = time.perf_counter()
    out = [step(prompt)]
    t_first = time.perf_counter()
    decode_s = 0.0
    while len(out) < n_tokens:
        out.append(step(out[-1:]))
        decode_s = time.perf_counter() - t_first
    return {"rpc_tok_s": (len(out) - 1) / decode_s if decode_s > 0 else 0.0,
            "prompt_tok_s": len(prompt) / (t_first - t0), "tokens": out}


def decode_main(request: dict[str, Any]) -> dict[str, Any]:
    if request["cpus"]:  # before llama.cpp starts threads, which inherit it
        os.sched_setaffinity(0, set(request["cpus"]))
    llama_cpp.llama_backend_init()
    devices = rpc_devices(request["endpoints"])
    mparams = llama_cpp.llama_model_default_params()
    if devices:
        dev_array = (ctypes.c_void_p * (len(devices) + 1))(*devices, None)
        split = (ctypes.c_float * llama_cpp.llama_max_devices())(
            *layer_weights(request["n_layer"], len(devices)))
        mparams.devices = ctypes.addressof(dev_array)
        mparams.n_gpu_layers = 999
        mparams.split_mode = LLAMA_SPLIT_MODE_LAYER
        mparams.tensor_split = split
    else:
        mparams.n_gpu_layers = 0
    model = llama_cpp.llama_model_load_from_file(request["model"].encode(), mparams)
    if not model:
        raise RuntimeError(f"llama.cpp could not load {request['model']}")
    cparams = llama_cpp.llama_context_default_params()
    cparams.n_ctx, cparams.n_batch, cparams.n_ubatch = 1024, 512, 512
    cparams.n_threads = cparams.n_threads_batch = request["threads"]
    # Our stages run f16 KV without flash attention; the same kernels here make the
    # tokens comparable (auto would pick flash attention on a CPU and round differently).
    cparams.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
    ctx = llama_cpp.llama_init_from_model(model, cparams)
    if not ctx:
        raise RuntimeError("llama.cpp could not create a context")
    return greedy_decode(ctx, model, request["prompt"], request["n_tokens"])


if __name__ == "__main__":
    req_path, res_path = map(Path, sys.argv[1:3])
    result = decode_main(json.loads(req_path.read_text()))
    res_path.write_text(json.dumps(result))
