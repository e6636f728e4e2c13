"""Who may talk to a worker: a shared token (gRPC metadata) and optional (mutual) TLS.

Anything that listens beyond loopback must be authenticated (secure default); the
token travels as `authorization: Bearer <token>` on every call, worker → worker too.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import socket
import stat
from dataclasses import dataclass
from pathlib import Path

import grpc

from cluster.errors import SpecshardError

METADATA_KEY = "authorization"


def new_token() -> str:
    return secrets.token_urlsafe(32)


def write_token(path: Path, token: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return path


def read_token(path: str | Path) -> str:
    path = Path(path)
    try:
        token = path.read_text().strip()
    except OSError as exc:
        raise SpecshardError(f"cannot read the token file {path}: {exc.strerror}") from exc
    if len(token) < 16:
        raise SpecshardError(f"the token in {path} is shorter than 16 characters")
    if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SpecshardError(f"{path} is readable by others: chmod 600 it")
    return token


def call_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return ((METADATA_KEY, f"Bearer {token}"),) if token else ()


def split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise SpecshardError(f"expected HOST:PORT, got {address!r}")
    return host.strip("[]"), int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return all(ipaddress.ip_address(info[4][0]).is_loopback
                       for info in socket.getaddrinfo(host, None))
        except (OSError, ValueError):
            return False


@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    key: Path
    ca: Path | None = None  # given: mutual TLS, peers must present a cert from this CA

    def _read(self, path: Path) -> bytes:
        try:
            return path.read_bytes()
        except OSError as exc:
            raise SpecshardError(f"cannot read {path}: {exc.strerror}") from exc

    def server_credentials(self) -> grpc.ServerCredentials:
        ca = self._read(self.ca) if self.ca else None
        return grpc.ssl_server_credentials(
            [(self._read(self.key), self._read(self.cert))], root_certificates=ca,
            require_client_auth=ca is not None)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self._read(self.ca) if self.ca else None,
            private_key=self._read(self.key), certificate_chain=self._read(self.cert))


def tls_from_args(cert: str | None, key: str | None, ca: str | None) -> TlsFiles | None:
    if not cert and not key and not ca:
        return None
    if not cert or not key:
        raise SpecshardError("TLS needs both --tls-cert and --tls-key")
    return TlsFiles(Path(cert), Path(key), Path(ca) if ca else None)


def check_listen(address: str, token: str | None) -> None:
    """Secure default: beyond loopback, no token, no listening."""
    host, _ = split_address(address)
    if not token and not is_loopback(host):
        raise SpecshardError(
            f"listening on {address} (not loopback) needs a token: pass --token-file")
