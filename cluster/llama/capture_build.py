"""Building the C capture (`capture.c`) with the system compiler, once per source and compiler.

The library lands in `<specshard home>/lib/capture-<hash>.so`; the hash covers the C
source, the compiler command, its flags and its `--version`, so a new source or a new
compiler builds anew and an unchanged one costs a `--version` call per process. It is
compiled with `$CC` (default `cc`) under a file lock into a temporary file renamed into
place: two processes starting together build it once and never load half a file.
No Python headers and no llama.cpp headers are needed (docs/architecture.md, "Stages"
technique, point 9). `make` builds it ahead with `python -m cluster.llama.capture_build`;
otherwise the first stage that needs it does.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shlex
import shutil
import subprocess
from pathlib import Path

from cluster.errors import SpecshardError
from cluster.paths import home

SOURCE = Path(__file__).with_name("capture.c")
FLAGS = ["-O2", "-shared", "-fPIC"]
TIMEOUT_S = 120  # a 60-line file: seconds at worst on a loaded 2-core box


class CaptureBuildError(SpecshardError):
    """The C capture could not be built; stages fall back to the Python capture."""


def compiler() -> list[str]:
    """`$CC` split like a shell would (`ccache gcc` works), default `cc`."""
    return shlex.split(os.environ.get("CC") or "cc")


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT_S,
                              check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise CaptureBuildError(f"{shlex.join(argv[:1])} did not run: {exc}") from exc


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "no output")


def library() -> Path:
    """The built library's path, building it if needed; CaptureBuildError says why not."""
    cc = compiler()
    if not cc or shutil.which(cc[0]) is None:
        raise CaptureBuildError(
            f"no C compiler: {cc[0] if cc else '$CC'!r} not found (install cc or set $CC)")
    version = _run([*cc, "--version"])
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), "\0".join(cc + FLAGS).encode(),
                 (version.stdout + version.stderr).encode()):
        key.update(part)
        key.update(b"\0")
    target = home() / "lib" / f"capture-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / "capture.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not target.exists():  # another process may have built it while we waited
            _compile(cc, target)
    return target


def _compile(cc: list[str], target: Path) -> None:
    partial = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    try:
        done = _run([*cc, *FLAGS, "-o", str(partial), str(SOURCE)])
        if done.returncode != 0:
            raise CaptureBuildError(f"{shlex.join(cc)} failed on {SOURCE.name} "
                                    f"({done.returncode}): {_first_line(done.stderr)}")
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)


if __name__ == "__main__":
    try:
        print(f"C capture: {library()}")
    except CaptureBuildError as exc:  # not fatal: stages use the Python capture
        print(f"C capture not built, the Python capture will be used: {exc}")
