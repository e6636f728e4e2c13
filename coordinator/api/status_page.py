"""The status page at `/`: static HTML, JS and CSS (`static/`, no build step) that read
`/v1/cluster`, `/metrics`, `/health` and `/v1/status/events` and refresh themselves.

The page itself holds no data, so it is served without a key; what it reads stays behind
the API key when one is set (the page asks for the key and keeps it in the browser's
localStorage). `/v1/status/events` is the coordinator's recent log records at the
configured level (`--log-level info`: load progress and ring events), kept in memory,
readable while the model is still loading, when `/v1/cluster` is not.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import Depends, FastAPI
from fastapi.responses import FileResponse, JSONResponse, Response

if TYPE_CHECKING:
    from coordinator.api.app import ServerState

STATIC = Path(__file__).with_name("static")
# The loggers whose records the page shows: ours, not Ray's, gRPC's or uvicorn's.
LOGGERS = ("coordinator", "cluster", "worker")
KEPT = 200
FILES = {"status.js": "text/javascript; charset=utf-8",
         "status.css": "text/css; charset=utf-8"}


class RecentRecords(logging.Handler):
    """The last `KEPT` log records of this process's own loggers, for the page."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: deque[dict[str, object]] = deque(maxlen=KEPT)
        self.seq = 0
        self.guard = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string must not break the caller's logging
            message = str(record.msg)
        with self.guard:
            self.seq += 1
            self.records.append({"seq": self.seq, "time": round(record.created, 3),
                                 "level": record.levelname, "logger": record.name,
                                 "message": message})

    def since(self, seq: int) -> list[dict[str, object]]:
        with self.guard:
            return [r for r in self.records if int(r["seq"]) > seq]  # type: ignore[call-overload]


_recent: RecentRecords | None = None
_install_lock = threading.Lock()


def recent_records() -> RecentRecords:
    """One handler per process (many apps may be created in one process, as in tests)."""
    global _recent
    with _install_lock:
        if _recent is None:
            _recent = RecentRecords()
            for name in LOGGERS:
                logging.getLogger(name).addHandler(_recent)
        return _recent


def install_status_page(app: FastAPI, state: ServerState, authorize: Callable[..., None]
                        ) -> None:
    """`/` (the page), `/status/<file>` (its script and style), `/v1/status/events`
    (behind the app's own key check, `authorize`)."""
    records = recent_records()
    started = time.time()

    @app.get("/", include_in_schema=False)
    async def page() -> Response:
        return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8",
                            headers={"Cache-Control": "no-cache"})

    @app.get("/status/{name}", include_in_schema=False)
    async def asset(name: str) -> Response:
        if name not in FILES:  # only these files: no path from the request reaches disk
            return Response("not found\n", 404, media_type="text/plain")
        return FileResponse(STATIC / name, media_type=FILES[name],
                            headers={"Cache-Control": "no-cache"})

    @app.get("/v1/status/events", include_in_schema=False,
             dependencies=[Depends(authorize)])
    async def events(after: int = 0) -> Response:
        return JSONResponse({"ready": state.engine is not None, "started": round(started, 3),
                             "now": round(time.time(), 3), "events": records.since(after)})
