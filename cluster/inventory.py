"""What the workers have, asked over gRPC, as nodes the planner can place layers on."""

from __future__ import annotations

from collections import Counter

import grpc

from cluster.auth import TlsFiles, call_metadata
from cluster.errors import SpecshardError
from cluster.messages import NodeInfo
from cluster.plans import NodeSpec
from cluster.wire import worker_pb2 as pb
from cluster.wire import worker_pb2_grpc as pb_grpc
from cluster.wire_convert import node_from_wire

# CPU-only nodes: llama.cpp needs little beyond the weights (no CUDA context or pool).
CPU_MARGIN_BYTES = 256 << 20


def query_node(address: str, token: str | None, tls: TlsFiles | None = None,
               timeout_s: float = 15.0) -> NodeInfo:
    channel = grpc.secure_channel(address, tls.channel_credentials()) if tls \
        else grpc.insecure_channel(address)
    with channel:
        try:
            reply = pb_grpc.WorkerStub(channel).GetNodeInfo(
                pb.NodeInfoRequest(), metadata=call_metadata(token), timeout=timeout_s)
        except grpc.RpcError as exc:
            code = exc.code()  # type: ignore[attr-defined]
            if code == grpc.StatusCode.UNAUTHENTICATED:
                raise SpecshardError(f"worker {address} refused the token") from None
            raise SpecshardError(f"worker {address} is not reachable: "
                                 f"{exc.details()}") from None  # type: ignore[attr-defined]
    return node_from_wire(reply)


def node_specs(addresses: list[str], infos: list[NodeInfo]) -> list[NodeSpec]:
    """One node per worker, named by its address: its GPU (one worker per GPU), or — on
    a machine without one — its share of the host's available RAM."""
    per_host = Counter(info.host.hostname for info in infos)
    nodes = []
    for address, info in zip(addresses, infos, strict=True):
        h = info.host
        if h.gpus:
            gpu = h.gpus[0]
            nodes.append(NodeSpec(address, gpu.total_bytes, free_bytes=gpu.free_bytes,
                                  ram_bytes=h.ram_total_bytes))
        else:
            share = h.ram_available_bytes // per_host[h.hostname]
            nodes.append(NodeSpec(address, share, ram_bytes=h.ram_total_bytes))
    return nodes


def has_gpus(infos: list[NodeInfo]) -> bool:
    return all(info.host.gpus for info in infos)
