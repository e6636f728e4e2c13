"""Running the API with uvicorn: in the foreground, or in a thread beside other work."""

from __future__ import annotations

import threading
import time
from types import TracebackType

import uvicorn
from fastapi import FastAPI

from cluster.errors import SpecshardError


def _server(app: FastAPI, host: str, port: int, grace: int) -> uvicorn.Server:
    # After `grace` seconds of shutdown, requests still running (streams) are cancelled,
    # which frees their sequences.
    return uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                         timeout_graceful_shutdown=grace))


class ServerThread:
    """`with ServerThread(app) as s:` serves `app` at `s.url` until the block ends.

    uvicorn leaves signals alone outside the main thread, so the caller decides when to
    stop."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0,
                 grace: int = 5, start_timeout: float = 30.0) -> None:
        self.server = _server(app, host, port, grace)
        self.grace = grace
        self.host = host
        self.start_timeout = start_timeout
        self.thread = threading.Thread(target=self.server.run, daemon=True, name="http")
        self.url = ""

    def start(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + self.start_timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise SpecshardError(f"the HTTP server did not start on {self.host} "
                                     "(is the port in use?)")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.url = f"http://{host}:{port}"
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        if self.thread.is_alive():
            self.thread.join(self.grace + timeout)
        if self.thread.is_alive():  # stuck past the grace period: skip the rest
            self.server.force_exit = True
            self.thread.join(timeout)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
