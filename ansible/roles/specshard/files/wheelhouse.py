"""Gather on the controller, once, every wheel a box needs to install specshard offline.

    wheelhouse.py --src specshard-src.tar --root DIR --llama-cpp VERSION --cmake-args ARGS

The wheels go to DIR/<key>/, the key naming llama-cpp-python's version and CMake flags
(a build per flags, as the boxes would make it). What is already there is reused: an
offline pass (`pip wheel --no-index`) is tried first, the package index only when it
lacks something, and llama-cpp-python is built (with CMAKE_ARGS) only when its wheel is
missing. The specshard wheel itself is not kept (each box installs the source archive).
The wheels are also packed into DIR/<key>.tar, the one file the playbook pushes.
Prints one JSON line: {"dir": ..., "archive": ..., "added": [new wheel files]}.

    wheelhouse.py --probe --root DIR --llama-cpp VERSION --cmake-args ARGS

prints what the wheels would fit (this machine's OS, machine, Python X.Y and glibc) and
whether llama-cpp-python can come from here: its wheel already in DIR/<key>/, or a
build here (a C compiler; for CUDA flags also nvcc).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

# What pip needs to build specshard's source archive on a box without an index.
BUILD = ["setuptools>=68", "wheel"]
MTIME = 946684800  # fixed, so the same wheels make the same archive
CUDA_NVCC = Path("/usr/local/cuda/bin/nvcc")  # where NVIDIA's packages put it


def wants_cuda(cmake_args: str) -> bool:
    return re.search(r"-DGGML_CUDA=(on|1|true|yes)\b", cmake_args, re.IGNORECASE) is not None


def nvcc() -> str | None:
    return shutil.which("nvcc") or (str(CUDA_NVCC) if CUDA_NVCC.exists() else None)


def probe(dest: Path, llama_cpp: str, cmake_args: str) -> dict[str, object]:
    """This machine as the wheels it makes would need it, and whether it can provide
    llama-cpp-python (the box-specific part) for these flags."""
    found = {"system": platform.system(), "machine": platform.machine(),
             "python": "{}.{}".format(*sys.version_info[:2]), "glibc": platform.libc_ver()[1]}
    if list(dest.glob(f"llama_cpp_python-{llama_cpp}-*.whl")):
        return {**found, "llama_cpp": True, "why": f"its wheel is in {dest}"}
    if not (shutil.which("cc") or shutil.which("gcc")):
        return {**found, "llama_cpp": False, "why": "no C compiler on the controller"}
    if wants_cuda(cmake_args) and not nvcc():
        return {**found, "llama_cpp": False,
                "why": f"CUDA flags and no nvcc on the controller (or put a wheel built on "
                       f"a box in {dest})"}
    return {**found, "llama_cpp": True, "why": "built here"}


def wheel(dest: Path, reqs: list[str], offline: bool, cmake_args: str
          ) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "pip", "wheel", "--disable-pip-version-check", "--quiet",
            "--progress-bar", "off", "--wheel-dir", str(dest), "--find-links", str(dest)]
    if offline:
        argv.append("--no-index")
    env = {**os.environ, "CMAKE_ARGS": cmake_args}
    compiler = nvcc() if wants_cuda(cmake_args) else None
    if compiler and "CUDACXX" not in env:
        env["CUDACXX"] = compiler
    return subprocess.run(argv + reqs, capture_output=True, text=True, env=env)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=Path)
    parser.add_argument("--root", required=True, type=Path)
    parser.add_argument("--llama-cpp", required=True)
    parser.add_argument("--cmake-args", default="")
    parser.add_argument("--probe", action="store_true", help="only say what fits (JSON)")
    args = parser.parse_args()
    key = hashlib.sha256(f"{args.llama_cpp} {args.cmake_args.strip()}".encode()).hexdigest()[:12]
    dest = args.root.expanduser() / key  # the default root is under ~ (the controller's)
    if args.probe:
        print(json.dumps(probe(dest, args.llama_cpp, args.cmake_args)))
        return 0
    if args.src is None:
        parser.error("--src is needed (unless --probe)")
    dest.mkdir(parents=True, exist_ok=True)
    before = {p.name for p in dest.glob("*.whl")}
    reqs = [str(args.src), f"llama-cpp-python=={args.llama_cpp}", *BUILD]
    done = wheel(dest, reqs, offline=True, cmake_args=args.cmake_args)
    if done.returncode != 0:
        done = wheel(dest, reqs, offline=False, cmake_args=args.cmake_args)
    if done.returncode != 0:
        print(f"pip wheel failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}", file=sys.stderr)
        return 1
    for own in dest.glob("specshard-*.whl"):
        own.unlink()
    added = sorted({p.name for p in dest.glob("*.whl")} - before)
    archive = pack(dest)
    print(json.dumps({"dir": str(dest), "archive": str(archive), "added": added}))
    return 0


def pack(dest: Path) -> Path:
    """The wheels as one tar beside the directory (one file to push, not a hundred),
    rewritten only when the wheels changed: same wheels, same bytes."""
    archive = dest.with_suffix(".tar")
    wheels = sorted(dest.glob("*.whl"))
    manifest = "".join(f"{p.name} {p.stat().st_size}\n" for p in wheels)
    listed = dest.with_suffix(".manifest")
    if archive.exists() and listed.exists() and listed.read_text() == manifest:
        return archive
    partial = archive.with_suffix(".tar.part")
    with tarfile.open(partial, "w", format=tarfile.PAX_FORMAT) as tar:
        for path in wheels:
            info = tar.gettarinfo(str(path), arcname=path.name)
            info.mtime, info.uid, info.gid, info.uname, info.gname = MTIME, 0, 0, "", ""
            info.mode = 0o644
            with path.open("rb") as f:
                tar.addfile(info, f)
    os.replace(partial, archive)
    listed.write_text(manifest)
    return archive


if __name__ == "__main__":
    sys.exit(main())
