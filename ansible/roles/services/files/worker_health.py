"""Ask a specshard worker the standard gRPC health question; exit 0 when it is SERVING.

A stand-in for grpc_health_probe that understands the cluster token and mutual TLS.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def channel(args: argparse.Namespace) -> grpc.Channel:
    if not args.ca:
        return grpc.insecure_channel(args.target)
    creds = grpc.ssl_channel_credentials(
        root_certificates=Path(args.ca).read_bytes(),
        private_key=Path(args.key).read_bytes() if args.key else None,
        certificate_chain=Path(args.cert).read_bytes() if args.cert else None)
    options = [("grpc.ssl_target_name_override", args.server_name)] if args.server_name else []
    return grpc.secure_channel(args.target, creds, options=options)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("target", help="HOST:PORT")
    parser.add_argument("--service", default="", help='the service to ask about (default "")')
    parser.add_argument("--token-file", help="send this token as `authorization: Bearer`")
    parser.add_argument("--ca", help="CA certificate: use TLS")
    parser.add_argument("--cert", help="client certificate (mutual TLS)")
    parser.add_argument("--key", help="client key (mutual TLS)")
    parser.add_argument("--server-name", help="the name the server's certificate is for")
    parser.add_argument("--timeout", type=float, default=3.0)
    args = parser.parse_args()
    metadata: tuple[tuple[str, str], ...] = ()
    if args.token_file:
        metadata = (("authorization", f"Bearer {Path(args.token_file).read_text().strip()}"),)
    with channel(args) as ch:
        try:
            reply = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=args.service),
                timeout=args.timeout, metadata=metadata)
        except grpc.RpcError as exc:
            print(f"{args.target}: {exc.code().name} {exc.details()}")
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{args.target}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main())
