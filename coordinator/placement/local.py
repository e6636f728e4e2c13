"""Worker processes on this machine, on loopback: `generate --workers N`, tests, benches.

Each worker gets a free port (it binds port 0 and writes the port to a file), the
cluster token (even on loopback: other local users can reach loopback ports), and —
with `pin` — its own CPU core, to emulate one box per worker on one machine. Each
ends when the process that started it does (`--parent-pid`).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cluster.auth import new_token, write_token
from cluster.errors import SpecshardError

START_TIMEOUT_S = 60.0
# Co-located llama.cpp processes: OpenMP threads spin after every op and starve each
# other (docs/build.md, "Idle threads").
SPIN_POLICY = {"GOMP_SPINCOUNT": "10000"}


def worker_env() -> dict[str, str]:
    env = dict(os.environ)
    for key, value in SPIN_POLICY.items():
        env.setdefault(key, value)
    return env


class LocalWorkers:
    def __init__(self, n: int, pin: bool = False, cores: list[int] | None = None) -> None:
        if n < 1:
            raise SpecshardError("--workers needs at least 1")
        self.n = n
        available = sorted(os.sched_getaffinity(0))
        self.cores = cores or [available[i % len(available)] for i in range(n)]
        self.pin = pin
        self.token = new_token()
        self._dir = tempfile.TemporaryDirectory(prefix="specshard-workers-")
        self.token_file = write_token(Path(self._dir.name) / "token", self.token)
        self.procs: list[subprocess.Popen[bytes]] = []
        self.addresses: list[str] = []
        self.tls = None  # loopback: the token is enough

    def start(self) -> LocalWorkers:
        try:
            for i in range(self.n):
                self.procs.append(self._spawn(i))
            self.addresses = [f"127.0.0.1:{self._wait_port(i)}" for i in range(self.n)]
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, i: int) -> subprocess.Popen[bytes]:
        base = Path(self._dir.name)
        cmd = [sys.executable, "-m", "cluster.cli", "worker", "--listen", "127.0.0.1:0",
               "--token-file", str(self.token_file), "--port-file", str(base / f"port{i}"),
               "--name", f"worker-{i}", "--parent-pid", str(os.getpid())]
        if self.pin:
            cmd += ["--pin", str(self.cores[i])]
        with open(base / f"worker{i}.log", "ab") as log:  # the child keeps its own copy
            return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                    env=worker_env())

    def _wait_port(self, i: int) -> int:
        port_file = Path(self._dir.name) / f"port{i}"
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if port_file.exists():
                return int(port_file.read_text())
            if self.procs[i].poll() is not None:
                raise SpecshardError(f"worker {i} exited at start: {self.log_tail(i)}")
            time.sleep(0.05)
        raise SpecshardError(f"worker {i} did not start within {START_TIMEOUT_S:.0f} s")

    # --- the WorkerSet protocol (coordinator/ring/supervisor.py) ------------------------

    def dead(self) -> list[int]:
        return [i for i, proc in enumerate(self.procs) if proc.poll() is not None]

    def restart(self, i: int) -> str:
        """Start worker i again (a new process on a new port)."""
        old = self.procs[i]
        if old.poll() is None:
            old.kill()
            old.wait()
        (Path(self._dir.name) / f"port{i}").unlink(missing_ok=True)
        self.procs[i] = self._spawn(i)
        self.addresses[i] = f"127.0.0.1:{self._wait_port(i)}"
        return self.addresses[i]

    def pids(self) -> list[int | None]:
        return [proc.pid for proc in self.procs]

    def log_tail(self, i: int, lines: int = 5) -> str:
        text = (Path(self._dir.name) / f"worker{i}.log").read_text(errors="replace")
        return " | ".join(text.strip().splitlines()[-lines:])

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._dir.cleanup()

    def __enter__(self) -> LocalWorkers:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()
