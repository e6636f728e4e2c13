"""The gRPC floor: a bare grpc.aio bidirectional-stream echo over loopback.

    python bench/grpc_echo.py [--bytes 64 65536 1048576] [--n 2000] [--gap-ms 0]

What one message of a given size costs between two pinned processes before any work is
done: the least a hop of our ring can cost (docs/architecture.md: ~170 µs p50 per message on this
2-vCPU box). No .proto: a generic handler passes raw bytes through identity
(de)serializers. The server and the client each run in their own process, pinned as our
workers are (by default client on core 0 like the coordinator, server on core 1 like the
second worker). Prints JSON (also bench/results/grpc_echo.json).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc

SERVICE, METHOD = "specshard.bench.Echo", "Echo"
START_TIMEOUT_S = 30.0
STOP_GRACE_S = 5.0
PING_TIMEOUT_S = 600.0
HEADROOM = 1 << 16  # over the payload, as worker/server.py's CHANNEL_OPTIONS
_ROOT = Path(__file__).resolve().parent.parent  # children run `-m bench.…` from here


def _options(payload_bytes: int) -> list[tuple[str, int]]:
    # gRPC refuses messages over 4 MiB by default; activations of long prefills exceed it.
    limit = payload_bytes + HEADROOM
    return [("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit)]


def _identity(data: bytes) -> bytes:
    return data


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL after STOP_GRACE_S (no import of the llama.cpp bench code:
    the children load this module and should start with grpc alone)."""
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _pin(core: int) -> None:
    """Pin every thread of this process (grpc may have started some at import)."""
    for tid in os.listdir("/proc/self/task"):
        os.sched_setaffinity(int(tid), {core})


async def _echo(requests: AsyncIterator[bytes], _context: Any) -> AsyncIterator[bytes]:
    async for message in requests:
        yield message


async def serve(port_file: Path, payload_bytes: int) -> None:
    """Serve the echo on a free loopback port, written to `port_file` once listening."""
    server = grpc.aio.server(options=_options(payload_bytes))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {
        METHOD: grpc.stream_stream_rpc_method_handler(
            _echo, request_deserializer=_identity, response_serializer=_identity)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    partial = port_file.with_suffix(".partial")  # the parent never reads half a number
    partial.write_text(str(port))
    partial.replace(port_file)
    await server.wait_for_termination()


async def ping(address: str, payload_bytes: int, n: int, warmup: int,
               gap_ms: float = 0.0) -> list[float]:
    """Round-trip ms of n messages on one stream, each sent after the last echo came —
    at once, or after `gap_ms` with both ends idle (time.sleep: the core really rests)."""
    payload = os.urandom(payload_bytes)
    async with grpc.aio.insecure_channel(address, options=_options(payload_bytes)) as channel:
        call = channel.stream_stream(f"/{SERVICE}/{METHOD}", request_serializer=_identity,
                                     response_deserializer=_identity)()
        times = []
        for i in range(warmup + n):  # warm-up: connection set-up, HTTP/2 window growth
            if gap_ms:
                time.sleep(gap_ms / 1e3)
            t0 = time.perf_counter()
            await call.write(payload)
            reply = await call.read()
            elapsed = (time.perf_counter() - t0) * 1e3
            if not isinstance(reply, bytes) or len(reply) != payload_bytes:
                raise RuntimeError(f"echo returned {type(reply).__name__} of wrong size")
            if i >= warmup:
                times.append(elapsed)
        if reply != payload:  # once, outside the timing
            raise RuntimeError("echo changed the payload")
        await call.done_writing()
        return times


class EchoServer:
    """The echo server in a child process pinned to `core`; stopped however a block ends."""

    def __init__(self, payload_bytes: int, core: int) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="specshard-echo-")
        port_file = Path(self._dir.name) / "port"
        cmd = [sys.executable, "-m", "bench.grpc_echo", "serve", "--port-file", str(port_file),
               "--bytes", str(payload_bytes), "--pin", str(core)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     cwd=_ROOT)
        try:
            self.address = f"127.0.0.1:{self._wait_port(port_file)}"
        except BaseException:
            self.stop()
            raise

    def _wait_port(self, port_file: Path) -> int:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if port_file.exists():
                return int(port_file.read_text())
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise RuntimeError(f"echo server exited: {err.strip()[-300:]}")
            time.sleep(0.02)
        raise RuntimeError(f"echo server not listening after {START_TIMEOUT_S:.0f} s")

    def stop(self) -> None:
        _stop(self.proc)  # SIGTERM, SIGKILL after the grace period
        if self.proc.stderr:
            self.proc.stderr.close()
        self._dir.cleanup()

    def __enter__(self) -> EchoServer:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile: a value that was measured."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def echo_floor_ms(payload_bytes: int, n: int, cpus: tuple[int, int] | None = None,
                  warmup: int = 20, gap_ms: float = 0.0) -> dict[str, Any]:
    """Round trips of `payload_bytes` over a grpc.aio stream, client and server pinned.

    cpus = (client core, server core); default the first two cores we may use. gap_ms:
    idle time before each message (0: back to back). A process woken from idle answers
    later than one that just answered (the VM's and the kernel's wake-up), and a ring's
    workers idle between steps, so a paced echo is the floor such a hop meets. Returns
    payload_bytes, n, gap_ms, p50_ms, p99_ms, min_ms, and one_way_p50_ms /
    one_way_p99_ms (half a round trip: the cost of one hop).
    """
    if n < 1:
        raise ValueError("n must be at least 1")
    cores = sorted(os.sched_getaffinity(0))
    client_core, server_core = cpus or (cores[0], cores[1 % len(cores)])
    with EchoServer(payload_bytes, server_core) as server, \
            tempfile.TemporaryDirectory(prefix="specshard-echo-ping-") as tmp:
        out = Path(tmp) / "times.json"
        cmd = [sys.executable, "-m", "bench.grpc_echo", "ping", "--address", server.address,
               "--bytes", str(payload_bytes), "--n", str(n), "--warmup", str(warmup),
               "--pin", str(client_core), "--out", str(out), "--gap-ms", str(gap_ms)]
        client = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  cwd=_ROOT)
        try:
            _, err = client.communicate(timeout=PING_TIMEOUT_S)
        finally:  # also on a timeout or an interrupt
            _stop(client)
        if client.returncode != 0 or not out.exists():
            raise RuntimeError(f"echo client failed ({client.returncode}): "
                               f"{err.decode(errors='replace').strip()[-300:]}")
        times: list[float] = json.loads(out.read_text())
    p50, p99 = percentile(times, 0.5), percentile(times, 0.99)
    return {"payload_bytes": payload_bytes, "n": n, "gap_ms": gap_ms, "p50_ms": p50,
            "p99_ms": p99,
            "min_ms": min(times), "one_way_p50_ms": p50 / 2, "one_way_p99_ms": p99 / 2}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode")
    server = sub.add_parser("serve", help="(internal) the echo server")
    server.add_argument("--port-file", type=Path, required=True)
    client = sub.add_parser("ping", help="(internal) the timed client")
    client.add_argument("--address", required=True)
    client.add_argument("--n", type=int, required=True)
    client.add_argument("--warmup", type=int, default=20)
    client.add_argument("--out", type=Path, required=True)
    client.add_argument("--gap-ms", type=float, default=0.0)
    for p in (server, client):
        p.add_argument("--bytes", type=int, required=True)
        p.add_argument("--pin", type=int, metavar="CORE", required=True)
    parser.add_argument("--bytes", type=int, nargs="+", default=[64, 65536, 1 << 20],
                        dest="sizes", help="payload sizes to measure")
    parser.add_argument("--n", type=int, default=2000, dest="count")
    parser.add_argument("--gap-ms", type=float, default=0.0, dest="gap",
                        help="idle ms before each message (default 0: back to back)")
    args = parser.parse_args()
    if args.mode == "serve":
        _pin(args.pin)
        asyncio.run(serve(args.port_file, args.bytes))
    elif args.mode == "ping":
        _pin(args.pin)
        args.out.write_text(json.dumps(asyncio.run(
            ping(args.address, args.bytes, args.n, args.warmup, args.gap_ms))))
    else:
        sys.path.insert(0, str(_ROOT))  # as `python bench/grpc_echo.py`
        from bench.machine import report  # imports llama_cpp: only for the report

        report("grpc_echo", {"bench": "grpc_echo", "grpc": grpc.__version__,
                             "floors": [echo_floor_ms(b, args.count, gap_ms=args.gap)
                                        for b in args.sizes]})


if __name__ == "__main__":
    main()
