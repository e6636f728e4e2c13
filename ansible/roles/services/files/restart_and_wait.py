"""Restart this box's specshard units one at a time and wait until each is back.

    restart_and_wait.py --unit specshard-worker@0 --grpc HOST:PORT [probe options]
                        [--ring http://COORDINATOR:PORT] [--timeout S]
    restart_and_wait.py --unit specshard-serve --http http://127.0.0.1:8000/health

The playbook's handlers run it box by box (`throttle: 1`), so a rolling restart keeps
the cluster serving: a worker's unit is restarted, its gRPC health check must answer
SERVING, then, when `--ring` names a coordinator that is serving, the coordinator must
have rebuilt its ring (its `specshard_worker_restarts_total` counter moves; it replays
the sequences the restart cut) and report every worker healthy before the next box
goes. The coordinator itself drains on SIGTERM (its unit's
stop timeout covers the drain) and must answer `/health` again. The API key for
`--ring` comes from SPECSHARD_API_KEY.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

# The coordinator's count of ring rebuilds after a lost worker (coordinator/metrics.py).
REBUILDS = "specshard_worker_restarts_total"


def grpc_serving(args: argparse.Namespace, target: str) -> bool:
    metadata: tuple[tuple[str, str], ...] = ()
    if args.token_file:
        token = Path(args.token_file).read_text().strip()
        metadata = (("authorization", f"Bearer {token}"),)
    if args.ca:
        creds = grpc.ssl_channel_credentials(
            root_certificates=Path(args.ca).read_bytes(),
            private_key=Path(args.key).read_bytes() if args.key else None,
            certificate_chain=Path(args.cert).read_bytes() if args.cert else None)
        options = [("grpc.ssl_target_name_override", args.server_name)] if args.server_name \
            else []
        channel = grpc.secure_channel(target, creds, options=options)
    else:
        channel = grpc.insecure_channel(target)
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=3, metadata=metadata)
        except grpc.RpcError:
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def http_status(url: str, key: str | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"}
                                     if key else {})
    try:
        with urllib.request.urlopen(request, timeout=5) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as exc:
        return exc.code, b""
    except (OSError, urllib.error.URLError):
        return 0, b""


def rebuilds(base: str) -> float | None:
    """How many times the coordinator has rebuilt its ring (its /metrics counter), or
    None when it is not serving."""
    status, body = http_status(base + "/metrics")
    if status != 200:
        return None
    for line in body.decode().splitlines():
        if line.startswith(REBUILDS + " "):
            return float(line.split()[-1])
    return 0.0


def ring_whole(base: str, key: str | None) -> bool:
    status, body = http_status(base + "/v1/cluster", key)
    if status != 200:
        return False
    nodes = json.loads(body).get("nodes", [])
    return bool(nodes) and all(n.get("healthy") for n in nodes)


def wait(what: str, check: object, timeout: float, every: float = 1.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise SystemExit(f"{what}: not within {timeout:.0f} s")
        time.sleep(every)
    print(f"{what}: ok", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--unit", action="append", default=[], help="systemd unit (repeat)")
    parser.add_argument("--grpc", action="append", default=[], help="worker HOST:PORT to "
                        "wait for, in --unit order")
    parser.add_argument("--http", help="URL that must answer 200 after the restart")
    parser.add_argument("--ring", help="the coordinator's base URL: wait for its ring")
    parser.add_argument("--token-file")
    parser.add_argument("--ca")
    parser.add_argument("--cert")
    parser.add_argument("--key")
    parser.add_argument("--server-name")
    parser.add_argument("--timeout", type=float, default=300.0)
    args = parser.parse_args()
    key = os.environ.get("SPECSHARD_API_KEY") or None
    for i, unit in enumerate(args.unit):
        # Is the coordinator serving now? Only then is there a ring to wait for.
        before = rebuilds(args.ring) if args.ring else None
        t0 = time.monotonic()
        subprocess.run(["systemctl", "restart", unit], check=True, timeout=args.timeout)
        print(f"{unit}: restarted in {time.monotonic() - t0:.1f} s", flush=True)
        if i < len(args.grpc):
            target = args.grpc[i]
            wait(f"{unit}: {target} serving", lambda t=target: grpc_serving(args, t),
                 args.timeout, 0.5)
        if before is not None:
            # The coordinator notices the restart (its watcher asks every second), rebuilds
            # the ring and replays what the restart cut: only then may the next box go.
            wait(f"{unit}: the coordinator's ring rebuilt",
                 lambda b=before: (rebuilds(args.ring) or 0) > b, args.timeout)
            if key:
                wait(f"{unit}: every worker of the ring healthy",
                     lambda: ring_whole(args.ring, key), args.timeout)
    if args.http:
        wait(f"{args.http} answering", lambda: http_status(args.http)[0] == 200,
             args.timeout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
