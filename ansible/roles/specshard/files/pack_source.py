"""Pack the controller's specshard checkout into a reproducible tar (an sdist pip takes).

Same files in, same bytes out: sorted names, fixed mtimes and owners, no caches. The
archive is rewritten only when its content changes, so Ansible's copy of it (and the
pip install behind it) runs only when the source really changed. Prints the sha256.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import sys
import tarfile
from pathlib import Path

INCLUDE = ("pyproject.toml", "README.md", "LICENSE", "cluster", "worker", "coordinator")
SKIP_DIRS = {"__pycache__", ".mypy_cache", ".ruff_cache", ".pytest_cache"}
SKIP_SUFFIXES = {".pyc", ".pyo", ".so", ".tmp"}
MTIME = 946684800  # 2000-01-01: wheels cannot hold zip timestamps before 1980


def members(root: Path) -> list[Path]:
    found = []
    for name in INCLUDE:
        path = root / name
        if path.is_file():
            found.append(path)
        elif path.is_dir():
            found += [p for p in path.rglob("*") if p.is_file()
                      and not SKIP_DIRS & set(p.relative_to(root).parts)
                      and p.suffix not in SKIP_SUFFIXES and not p.name.endswith(".egg-info")]
    return sorted(found)


def pack(root: Path) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in members(root):
            info = tarfile.TarInfo(f"specshard-src/{path.relative_to(root).as_posix()}")
            data = path.read_bytes()
            info.size, info.mtime, info.mode = len(data), MTIME, 0o644
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--src", type=Path, required=True, help="the specshard checkout")
    parser.add_argument("--out", type=Path, required=True, help="the archive to write")
    args = parser.parse_args()
    if not (args.src / "pyproject.toml").is_file():
        print(f"{args.src} is not a specshard checkout (no pyproject.toml)", file=sys.stderr)
        return 1
    data = pack(args.src.resolve())
    if not args.out.is_file() or args.out.read_bytes() != data:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_bytes(data)
    print(hashlib.sha256(data).hexdigest())
    return 0


if __name__ == "__main__":
    sys.exit(main())
