"""Download a model once on the controller: resumable, retried, checked against its sha256.

    fetch_model.py --url URL --sha256 HEX --out FILE

Bytes go to FILE.part and continue from where an interrupted run stopped (an HTTP Range
request); the file is renamed to FILE only when its sha256 matches. A verified file is
recorded in FILE.sha256 (hash, size, mtime), so later runs do not hash 20 GB again.
Prints `present FILE` or `downloaded FILE`; exit 1 with the reason otherwise.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

CHUNK = 1 << 20
TRIES = 8


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def stamp(path: Path, sha: str) -> str:
    st = path.stat()
    return f"{sha} {st.st_size} {int(st.st_mtime)}\n"


def verified(path: Path, sha: str) -> bool:
    marker = path.with_name(path.name + ".sha256")
    if not path.is_file():
        return False
    if marker.is_file() and marker.read_text() == stamp(path, sha):
        return True
    if sha256_of(path) != sha:
        return False
    marker.write_text(stamp(path, sha))
    return True


def download(url: str, part: Path, timeout: float) -> None:
    """Append the rest of `url` to `part`, retrying with growing pauses."""
    for attempt in range(1, TRIES + 1):
        have = part.stat().st_size if part.exists() else 0
        request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as reply:
                if have and reply.status != 206:  # the server ignored the range: start over
                    have = 0
                expected = int(reply.headers.get("Content-Length", -1))
                got = 0
                with part.open("ab" if have else "wb") as out:
                    while block := reply.read(CHUNK):
                        out.write(block)
                        got += len(block)
                if 0 <= expected != got:
                    raise ConnectionError(f"the reply stopped after {got} of {expected} bytes")
            return
        except urllib.error.HTTPError as exc:
            if exc.code == 416:  # nothing left to fetch
                return
            if exc.code < 500 or attempt == TRIES:
                raise
        except (OSError, http.client.HTTPException):
            if attempt == TRIES:
                raise
        time.sleep(min(2 ** attempt, 60))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--sha256", required=True)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds without data")
    args = parser.parse_args()
    sha = args.sha256.lower()
    out: Path = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    if verified(out, sha):
        print(f"present {out}")
        return 0
    part = out.with_name(out.name + ".part")
    try:
        download(args.url, part, args.timeout)
    except (OSError, http.client.HTTPException) as exc:
        print(f"cannot download {args.url}: {exc} ({part} keeps what arrived; run again "
              "to resume)", file=sys.stderr)
        return 1
    got = sha256_of(part)
    if got != sha:
        part.unlink()
        print(f"{args.url}: sha256 {got}, expected {sha}; the download was removed",
              file=sys.stderr)
        return 1
    os.replace(part, out)
    out.with_name(out.name + ".sha256").write_text(stamp(out, sha))
    print(f"downloaded {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
