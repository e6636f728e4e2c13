"""One llama.cpp rpc-server on a CPU backend: `python -m bench.rpc_server_child`.

    python -m bench.rpc_server_child --endpoint 127.0.0.1:50052 --threads 1 --pin 0

llama-cpp-python ships libggml-rpc.so but no `rpc-server` binary, so this calls
`ggml_backend_rpc_start_server` through ctypes — the same call tools/rpc/rpc-server.cpp
makes. It serves one client at a time and never returns; the parent stops it with a
signal.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import os
from pathlib import Path

# Found without importing llama_cpp: its import loads libllama and installs a log hook,
# neither of which a server needs.
_spec = importlib.util.find_spec("llama_cpp")
if _spec is None or not _spec.submodule_search_locations:
    raise ImportError("llama_cpp is not installed")
LIB_DIR = Path(list(_spec.submodule_search_locations)[0]) / "lib"

GGML_BACKEND_DEVICE_TYPE_CPU = 0  # ggml-backend.h: enum ggml_backend_dev_type


def cpu_device(ggml: ctypes.CDLL) -> int:
    ggml.ggml_backend_dev_by_type.argtypes = [ctypes.c_int]
    ggml.ggml_backend_dev_by_type.restype = ctypes.c_void_p
    dev = ggml.ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU)
    if not dev:
        raise RuntimeError("ggml has no CPU device")
    return int(dev)


def serve(endpoint: str, threads: int) -> None:
    """Block serving `endpoint`; returns only if llama.cpp fails to start (it logs why)."""
    ggml = ctypes.CDLL(str(LIB_DIR / "libggml.so"))  # registers the CPU and RPC backends
    rpc = ctypes.CDLL(str(LIB_DIR / "libggml-rpc.so"))
    # ggml-rpc.h (proto 7): (endpoint, cache_dir, n_threads, n_devices, devices)
    start = rpc.ggml_backend_rpc_start_server
    start.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_size_t,
                      ctypes.POINTER(ctypes.c_void_p)]
    start.restype = None
    devices = (ctypes.c_void_p * 1)(cpu_device(ggml))
    start(endpoint.encode(), None, threads, 1, devices)  # no cache dir: as rpc-server without -c


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--endpoint", required=True, help="host:port to listen on")
    parser.add_argument("--threads", type=int, default=1, help="CPU backend threads")
    parser.add_argument("--pin", type=int, metavar="CORE", help="run on this CPU core only")
    args = parser.parse_args()
    if args.pin is not None:  # before ggml starts its thread pool, which inherits it
        os.sched_setaffinity(0, {args.pin})
    serve(args.endpoint, args.threads)
    return 1  # start_server only returns on failure


if __name__ == "__main__":
    raise SystemExit(main())
