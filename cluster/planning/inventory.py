"""What the workers have, asked over gRPC, as nodes the planner can place layers on."""

from __future__ import annotations

import logging
from collections import Counter

import grpc

from cluster.auth import TlsFiles, call_metadata
from cluster.errors import SpecshardError
from cluster.messages import NodeInfo
from cluster.planning.plans import NodeSpec
from cluster.wire import worker_pb2 as pb
from cluster.wire import worker_pb2_grpc as pb_grpc
from cluster.wire_convert import node_from_wire

log = logging.getLogger(__name__)
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
    """One node per worker. With one worker per GPU, each worker sees one GPU and is named
    after it (`host:gpu1`); workers that see the same GPU share it, as CPU-only workers
    share their host's available RAM, and are named by address."""
    sharing = Counter(_device(info) for info in infos)
    nodes = []
    for address, info in zip(addresses, infos, strict=True):
        h, n = info.host, sharing[_device(info)]
        if not h.gpus:
            nodes.append(NodeSpec(address, h.ram_available_bytes // n,
                                  ram_bytes=h.ram_total_bytes))
            continue
        gpu = h.gpus[0]
        if len(h.gpus) > 1:  # planned on its first GPU alone, which is on the safe side
            log.warning("worker %s sees %d GPUs and llama.cpp spreads its stage over all "
                        "of them; run one worker per GPU (specshard worker --gpu N)",
                        address, len(h.gpus))
        nodes.append(NodeSpec(f"{h.hostname}:gpu{gpu.index}" if n == 1 else address,
                              gpu.total_bytes // n, free_bytes=gpu.free_bytes // n,
                              ram_bytes=h.ram_total_bytes))
    return nodes


def _device(info: NodeInfo) -> tuple[str, int | None]:
    """What a worker computes on: its host's GPU (the first it sees), or its host's CPU."""
    return info.host.hostname, info.host.gpus[0].index if info.host.gpus else None


def has_gpus(infos: list[NodeInfo]) -> bool:
    return all(info.host.gpus for info in infos)
