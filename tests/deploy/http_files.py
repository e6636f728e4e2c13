"""A file server on loopback that honours HTTP Range requests (as model hosts do), for
the playbook's controller-side download; `cut_first` drops the first reply after that
many bytes, to prove a download resumes."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class Served:
    def __init__(self, server: ThreadingHTTPServer) -> None:
        self.server = server
        self.ranges: list[str] = []  # the Range header of every request ("" without)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"


@contextmanager
def serve_files(root: Path, cut_first: int | None = None) -> Iterator[Served]:
    state: dict[str, int | None] = {"cut": cut_first}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            path = (root / self.path.lstrip("/")).resolve()
            if root.resolve() not in path.parents or not path.is_file():
                self.send_error(404)
                return
            size = path.stat().st_size
            asked = self.headers.get("Range", "")
            served.ranges.append(asked)
            start = int(asked.removeprefix("bytes=").split("-")[0]) if asked else 0
            if start >= size:
                self.send_error(416)
                return
            self.send_response(206 if asked else 200)
            self.send_header("Content-Length", str(size - start))
            if asked:
                self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
            self.end_headers()
            limit = state["cut"]
            state["cut"] = None
            with path.open("rb") as f:
                f.seek(start)
                sent = 0
                while block := f.read(1 << 20):
                    if limit is not None and sent + len(block) > limit:
                        self.wfile.write(block[:limit - sent])
                        self.wfile.flush()
                        self.close_connection = True
                        return  # the connection drops mid-file
                    self.wfile.write(block)
                    sent += len(block)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    served = Served(server)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield served
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
