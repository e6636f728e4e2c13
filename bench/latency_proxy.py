"""A TCP proxy that delays every chunk by a fixed one-way latency: a LAN on loopback.

    with LatencyProxy(target=("127.0.0.1", port), one_way_ms=0.5) as proxy:
        connect_to(proxy.address)  # "127.0.0.1:PORT"

The kernel here has no netem, so this is how benches put a network between processes.
Each chunk leaves `one_way_ms` after it arrived, in order; a later chunk does not wait
for an earlier one's delay, so bandwidth is not capped, and each connection has its own
tasks. Bytes are not inspected: llama.cpp RPC and gRPC (HTTP/2) both pass.

The proxy runs in its own process (`python -m bench.latency_proxy`) so that it never
competes for the GIL with a coordinator in the bench process.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import select
import selectors
import subprocess
import sys
from pathlib import Path

START_TIMEOUT_S = 10.0
STOP_GRACE_S = 5.0
CHUNK = 1 << 16
QUEUE_CHUNKS = 256  # ≤ 16 MiB in flight per direction before the reader waits
_ROOT = Path(__file__).resolve().parent.parent


async def _read(reader: asyncio.StreamReader, queue: asyncio.Queue[tuple[float, bytes]],
                delay_s: float) -> None:
    loop = asyncio.get_running_loop()
    try:
        while data := await reader.read(CHUNK):
            await queue.put((loop.time() + delay_s, data))
    except ConnectionError:
        pass
    await queue.put((loop.time() + delay_s, b""))  # EOF travels with the same delay


async def _write(writer: asyncio.StreamWriter,
                 queue: asyncio.Queue[tuple[float, bytes]]) -> None:
    loop = asyncio.get_running_loop()
    while True:
        due, data = await queue.get()
        if (wait := due - loop.time()) > 0:
            await asyncio.sleep(wait)
        if not data:
            if writer.can_write_eof():
                writer.write_eof()  # half-close: the other direction may still be talking
            return
        writer.write(data)
        await writer.drain()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                delay_s: float) -> None:
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(QUEUE_CHUNKS)
    await asyncio.gather(_read(reader, queue, delay_s), _write(writer, queue))


async def _relay(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter,
                 target: tuple[str, int], delay_s: float) -> None:
    try:
        server_r, server_w = await asyncio.open_connection(*target)
    except OSError:
        client_w.close()
        return
    try:
        await asyncio.gather(_pipe(client_r, server_w, delay_s),
                             _pipe(server_r, client_w, delay_s))
    except OSError:
        pass  # a reset (or a probe that closed at once) on one side ends both
    finally:
        server_w.close()
        client_w.close()


async def serve(listen_port: int, target: tuple[str, int], one_way_ms: float) -> None:
    """Proxy 127.0.0.1:listen_port → target until cancelled; prints the bound port."""
    delay_s = one_way_ms / 1000

    async def on_client(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await _relay(r, w, target, delay_s)

    server = await asyncio.start_server(on_client, "127.0.0.1", listen_port)
    print(server.sockets[0].getsockname()[1], flush=True)
    async with server:
        await server.serve_forever()


def new_loop() -> asyncio.AbstractEventLoop:
    """An event loop whose timers are good to ~0.1 ms.

    epoll and poll time out in whole milliseconds, so asyncio's default loop would turn a
    0.5 ms delay into ≥ 1 ms; select() takes microseconds. A proxy has a handful of
    sockets, far below select's FD_SETSIZE.
    """
    return asyncio.SelectorEventLoop(selectors.SelectSelector())


class LatencyProxy:
    """`python -m bench.latency_proxy` as a context manager; `address` is where to connect."""

    def __init__(self, target: tuple[str, int], one_way_ms: float = 0.5,
                 listen_port: int = 0, cpu: int | None = None) -> None:
        self.target = target
        self.one_way_ms = one_way_ms
        self.listen_port = listen_port
        self.cpu = cpu
        self.address = ""
        self._proc: subprocess.Popen[str] | None = None

    def start(self) -> LatencyProxy:
        cmd = [sys.executable, "-m", "bench.latency_proxy", f"{self.target[0]}:{self.target[1]}",
               "--one-way-ms", str(self.one_way_ms), "--port", str(self.listen_port)]
        if self.cpu is not None:
            cmd += ["--pin", str(self.cpu)]
        self._proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=_ROOT)
        assert self._proc.stdout is not None
        ready, _, _ = select.select([self._proc.stdout], [], [], START_TIMEOUT_S)
        line = self._proc.stdout.readline() if ready else ""
        if not line.strip().isdigit():
            self.stop()
            raise RuntimeError(f"latency proxy to {self.target} did not start: {line!r}")
        self.address = f"127.0.0.1:{int(line)}"
        return self

    def stop(self) -> None:
        if self._proc is None:
            return
        self._proc.terminate()
        try:
            self._proc.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        if self._proc.stdout:
            self._proc.stdout.close()
        self._proc = None

    def __enter__(self) -> LatencyProxy:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target", help="host:port to forward to")
    parser.add_argument("--one-way-ms", type=float, default=0.5)
    parser.add_argument("--port", type=int, default=0, help="port to listen on (0: any)")
    parser.add_argument("--pin", type=int, metavar="CORE", help="run on this CPU core only")
    args = parser.parse_args()
    if args.pin is not None:
        os.sched_setaffinity(0, {args.pin})
    host, port = args.target.rsplit(":", 1)
    loop = new_loop()
    try:
        loop.run_until_complete(serve(args.port, (host, int(port)), args.one_way_ms))
    except KeyboardInterrupt:
        pass
    finally:
        loop.close()


if __name__ == "__main__":
    main()
