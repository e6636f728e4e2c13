"""Copy a model from one box to another over SSH: resumable, checked against its sha256.

On the box that has the model (the playbook runs it as root):

    model_copy.py send --path FILE --name NAME --to ADDRESS --port P --user U
                       --key KEY --known-hosts FILE --alias HOST

connects with KEY (made for this run) to the receiving box, whose host key must be the
one in --known-hosts under the name --alias. There the key is authorized only for the
duration of the run, only from the sending box's address, without a pty or forwarding,
and only for this script as its forced command:

    model_copy.py receive --dir DIR --file NAME=SHA256 [--file NAME=SHA256 ...]

which accepts nothing but `receive NAME` for a NAME listed there. The sender says the
file's size; the receiver answers `present` (DIR/NAME already has that size and sha256)
or `from N`, N the bytes DIR/.NAME.part kept from an interrupted copy; the sender sends
the rest; the receiver hashes the whole part, renames it to DIR/NAME only when its
sha256 is the one the forced command names (otherwise it is removed), says `verified`,
and logs the copy to syslog (the journal) as `specshard-model-copy`. send prints one
JSON line: {"result": "sent" | "present", "from": N, "bytes": ..., "seconds": ...}.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import subprocess
import sys
import syslog
import time
from pathlib import Path

CHUNK = 1 << 20


def hash_into(digest: hashlib._Hash, path: Path, size: int) -> None:
    with path.open("rb") as f:
        left = size
        while left > 0 and (block := f.read(min(CHUNK, left))):
            digest.update(block)
            left -= len(block)


def receive(args: argparse.Namespace) -> int:
    allowed = dict(spec.split("=", 1) for spec in args.file)
    words = os.environ.get("SSH_ORIGINAL_COMMAND", "").split()
    if len(words) != 2 or words[0] != "receive" or words[1] not in allowed:
        print(f"refused: {' '.join(words)[:200]!r}", file=sys.stderr)
        return 2
    name, sha = words[1], allowed[words[1]].lower()
    peer = os.environ.get("SSH_CLIENT", "?").split()[0]
    final, part = args.dir / name, args.dir / f".{name}.part"
    stdin, stdout = sys.stdin.buffer, sys.stdout
    line = stdin.readline().strip()
    if not line.isdigit():
        print("refused: expected the file's size", file=sys.stderr)
        return 2
    size = int(line)
    if final.is_file() and final.stat().st_size == size:
        digest = hashlib.sha256()
        hash_into(digest, final, size)
        if digest.hexdigest() == sha:
            print("present", file=stdout, flush=True)
            return 0
    have = part.stat().st_size if part.is_file() else 0
    if have > size:
        have = 0
    print(f"from {have}", file=stdout, flush=True)
    t0 = time.monotonic()
    digest = hashlib.sha256()
    if have:
        hash_into(digest, part, have)
    got = have
    with part.open("r+b" if have else "wb") as out:
        out.truncate(have)
        out.seek(have)
        while block := stdin.read(CHUNK):
            out.write(block)
            digest.update(block)
            got += len(block)
        out.flush()
        os.fsync(out.fileno())
    if got < size:
        print(f"interrupted after {got} of {size} bytes ({part} keeps them: the next run "
              "resumes)", file=sys.stderr)
        return 1
    if got > size or digest.hexdigest() != sha:
        part.unlink()
        print(f"{name}: sha256 {digest.hexdigest()} ({got} bytes), expected {sha}; "
              "removed", file=sys.stderr)
        return 1
    part.chmod(0o644)
    os.replace(part, final)
    seconds = time.monotonic() - t0
    syslog.openlog("specshard-model-copy")
    syslog.syslog(f"received {name} from {peer}: bytes {have}-{size} in {seconds:.1f} s, "
                  f"sha256 {sha} verified")
    print(f"verified {sha}", file=stdout, flush=True)
    return 0


def ssh_argv(args: argparse.Namespace) -> list[str]:
    return ["ssh", "-F", "/dev/null", "-T", "-i", str(args.key), "-l", args.user,
            "-p", str(args.port), "-o", "IdentitiesOnly=yes", "-o", "IdentityAgent=none",
            "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
            "-o", f"UserKnownHostsFile={args.known_hosts}",
            "-o", "GlobalKnownHostsFile=/dev/null", "-o", f"HostKeyAlias={args.alias}",
            "-o", "HostKeyAlgorithms=ssh-ed25519", "-o", "ConnectTimeout=20",
            "-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=4",
            "-o", "ClearAllForwardings=yes", "-o", "ControlPath=none",
            args.to, "receive", args.name]


def attempt(args: argparse.Namespace, size: int) -> tuple[str, int | None, str]:
    """One session: ("present" | "sent" | "failed", the byte it started from, errors)."""
    proc = subprocess.Popen(ssh_argv(args), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    answer: list[str] = []
    start = None
    try:
        proc.stdin.write(f"{size}\n".encode())
        proc.stdin.flush()
        answer = proc.stdout.readline().decode().split()
        if answer[:1] == ["from"] and len(answer) == 2 and answer[1].isdigit():
            start = int(answer[1])
            with args.path.open("rb") as f:
                f.seek(start)
                while block := f.read(CHUNK):
                    proc.stdin.write(block)
    except BrokenPipeError:  # the receiver stopped reading: its reason is on stderr
        pass
    with contextlib.suppress(BrokenPipeError):
        proc.stdin.close()
    reply = proc.stdout.read().decode().split()
    errors = proc.stderr.read().decode(errors="replace").strip()
    rc = proc.wait()
    if rc == 0 and answer == ["present"]:
        return "present", size, ""
    if rc == 0 and start is not None and reply[:1] == ["verified"]:
        return "sent", start, ""
    return "failed", start, (f"ssh exit {rc}: "
                             f"{errors or ' '.join(answer + reply) or 'no answer'}")


def send(args: argparse.Namespace) -> int:
    size = args.path.stat().st_size
    t0 = time.monotonic()
    result, start, errors = attempt(args, size)
    if result == "failed" and start:  # what an earlier copy kept did not check out
        result, start, errors = attempt(args, size)  # the receiver removed it: from 0
    if result == "failed":
        print(f"copying {args.path} to {args.user}@{args.to}:{args.port} failed ({errors})",
              file=sys.stderr)
        return 1
    print(json.dumps({"result": result, "from": start, "bytes": size - (start or 0),
                      "seconds": round(time.monotonic() - t0, 1)}))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    modes = parser.add_subparsers(dest="mode", required=True)
    rx = modes.add_parser("receive", help="the forced command on the receiving box")
    rx.add_argument("--dir", required=True, type=Path)
    rx.add_argument("--file", required=True, action="append", help="NAME=SHA256")
    tx = modes.add_parser("send", help="on the box that has the model")
    tx.add_argument("--path", required=True, type=Path)
    tx.add_argument("--name", required=True)
    tx.add_argument("--to", required=True, help="the receiving box's address")
    tx.add_argument("--port", type=int, default=22)
    tx.add_argument("--user", default="root")
    tx.add_argument("--key", required=True, type=Path)
    tx.add_argument("--known-hosts", required=True, type=Path)
    tx.add_argument("--alias", required=True, help="the receiver's name in --known-hosts")
    args = parser.parse_args()
    return receive(args) if args.mode == "receive" else send(args)


if __name__ == "__main__":
    sys.exit(main())
