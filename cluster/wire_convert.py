"""The one place where protobuf meets domain objects (STYLE.md: convert in one module).

Also where a message is checked for shape before any worker acts on it: wrong byte
lengths, non-contiguous positions, inconsistent chunks raise InvalidForward here.
"""

from __future__ import annotations

import numpy as np

from cluster.errors import InvalidForward, SpecshardError
from cluster.hardware import GpuInfo, HostInfo
from cluster.messages import Hop, LoadSpec, LoadUpdate, NodeInfo, Peer, StepRequest, StepResult
from cluster.sampling import SamplingParams, SparseDist
from cluster.wire import worker_pb2 as pb

# gRPC's default receive limit is 4 MiB; chunks stay well under it with the metadata.
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
CHUNK_BYTES = 3 * 1024 * 1024
_DTYPES: dict[int, np.dtype] = {
    pb.HIDDEN_DTYPE_F32: np.dtype("<f4"), pb.HIDDEN_DTYPE_F16: np.dtype("<f2")}


# --- sampling -------------------------------------------------------------------------

def sampling_to_wire(params: SamplingParams) -> pb.Sampling:
    return pb.Sampling(temperature=params.temperature, top_k=params.top_k, top_p=params.top_p)


def sampling_from_wire(msg: pb.Sampling) -> SamplingParams:
    try:  # proto3 floats default to 0; top-p 0 means "unset" (1), as it is invalid anyway
        return SamplingParams(temperature=msg.temperature, top_k=msg.top_k,
                              top_p=msg.top_p or 1.0)
    except SpecshardError as exc:
        raise InvalidForward(str(exc)) from exc


def dist_to_wire(dist: SparseDist) -> pb.SparseDist:
    return pb.SparseDist(ids=dist.ids.tolist(), probs=dist.probs.tolist())


def dist_from_wire(msg: pb.SparseDist) -> SparseDist:
    ids = np.array(msg.ids, dtype=np.int64)
    probs = np.array(msg.probs, dtype=np.float64)
    if ids.size == 0 or ids.size != probs.size or not np.isfinite(probs).all() \
            or (probs < 0).any() or abs(probs.sum() - 1) > 1e-3:
        raise InvalidForward("a draft distribution is not a probability distribution")
    return SparseDist(ids, probs)


# --- steps ----------------------------------------------------------------------------

def hop_to_wire(hop: Hop, f16: bool = False) -> list[pb.ForwardMessage]:
    """One step as messages: the first carries everything, more chunks carry bytes only."""
    r = hop.request
    head = pb.ForwardMessage(
        seq=r.seq, step_id=r.step_id,
        positions=list(range(r.start, r.end)) if r.tokens else [r.start],
        tokens=r.tokens, n_draft=r.n_draft, draft_dists=[dist_to_wire(d) for d in
                                                          r.draft_dists],
        sampling=sampling_to_wire(r.sampling), step_seed=r.step_seed, cancel=hop.cancel,
        return_logits=r.return_logits, n_chunks=1)
    if hop.hidden is None:
        return [head]
    dtype = _DTYPES[pb.HIDDEN_DTYPE_F16 if f16 else pb.HIDDEN_DTYPE_F32]
    data = np.ascontiguousarray(hop.hidden, dtype=dtype).tobytes()
    head.dtype = pb.HIDDEN_DTYPE_F16 if f16 else pb.HIDDEN_DTYPE_F32
    head.n_embd = hop.hidden.shape[1]
    pieces = [data[i:i + CHUNK_BYTES] for i in range(0, len(data), CHUNK_BYTES)] or [b""]
    head.n_chunks = len(pieces)
    head.hidden = pieces[0]
    rest = [pb.ForwardMessage(seq=r.seq, step_id=r.step_id, hidden=piece, chunk_index=i,
                              n_chunks=len(pieces))
            for i, piece in enumerate(pieces[1:], start=1)]
    return [head, *rest]


class HopAssembler:
    """Turns the messages of one upstream stream back into hops (chunks in order)."""

    def __init__(self) -> None:
        self._head: pb.ForwardMessage | None = None
        self._pieces: list[bytes] = []

    def add(self, msg: pb.ForwardMessage) -> Hop | None:
        if self._head is None:
            if msg.chunk_index != 0:
                raise InvalidForward(f"chunk {msg.chunk_index} of step {msg.step_id} "
                                     "arrived without its first chunk")
            self._head, self._pieces = msg, [msg.hidden]
        else:
            head = self._head
            if (msg.seq, msg.step_id, msg.chunk_index) != \
                    (head.seq, head.step_id, len(self._pieces)):
                self._head = None
                raise InvalidForward(f"chunks of step {head.step_id} out of order")
            self._pieces.append(msg.hidden)
        if len(self._pieces) < max(self._head.n_chunks, 1):
            return None
        head, data = self._head, b"".join(self._pieces)
        self._head, self._pieces = None, []
        return hop_from_wire(head, data)


def hop_from_wire(msg: pb.ForwardMessage, data: bytes) -> Hop:
    positions = list(msg.positions)
    if not positions:
        raise InvalidForward("a forward message needs positions")
    start = positions[0]
    if start < 0:
        raise InvalidForward(f"negative position {start}")
    request = StepRequest(seq=msg.seq, start=start, tokens=list(msg.tokens),
                          sampling=sampling_from_wire(msg.sampling), n_draft=msg.n_draft,
                          step_seed=msg.step_seed, step_id=msg.step_id,
                          return_logits=msg.return_logits)
    if msg.cancel:
        return Hop(request, cancel=True)
    if positions != list(range(start, start + len(positions))):
        raise InvalidForward("positions must be contiguous and increasing")
    if len(msg.tokens) != len(positions):
        raise InvalidForward(f"{len(msg.tokens)} tokens for {len(positions)} positions")
    if msg.n_draft >= len(positions):
        raise InvalidForward(f"{msg.n_draft} draft guesses in a batch of {len(positions)}")
    dists = [dist_from_wire(d) for d in msg.draft_dists]
    if dists and len(dists) != msg.n_draft:
        raise InvalidForward(f"{len(dists)} draft distributions for {msg.n_draft} guesses")
    if not request.sampling.greedy and len(dists) != msg.n_draft:
        raise InvalidForward("sampled verification needs the draft's distributions")
    request = StepRequest(**{**request.__dict__, "draft_dists": dists})
    return Hop(request, hidden=_hidden_from_wire(msg, data, len(positions)))


def _hidden_from_wire(msg: pb.ForwardMessage, data: bytes, n_tokens: int
                      ) -> np.ndarray | None:
    if not data and not msg.n_embd:
        return None
    dtype = _DTYPES.get(msg.dtype)
    if dtype is None:
        raise InvalidForward(f"unknown hidden-state dtype {msg.dtype}")
    want = n_tokens * msg.n_embd * dtype.itemsize
    if msg.n_embd == 0 or len(data) != want:
        raise InvalidForward(f"hidden states are {len(data)} bytes; {n_tokens} tokens × "
                             f"{msg.n_embd} × {dtype.itemsize} bytes = {want}")
    return np.frombuffer(data, dtype=dtype).astype(np.float32).reshape(n_tokens, msg.n_embd)


def result_to_wire(result: StepResult, stage_ms: float) -> pb.ForwardReply:
    msg = pb.StepResult(accepted=result.accepted, next_token=result.next_token,
                        top2_gaps=result.top2_gaps)
    if result.logits is not None:
        msg.logits = np.ascontiguousarray(result.logits, dtype="<f4").tobytes()
        msg.n_vocab = result.logits.shape[1]
    return pb.ForwardReply(seq=result.seq, step_id=result.step_id, stage_ms=stage_ms,
                           result=msg)


def result_from_wire(reply: pb.ForwardReply) -> StepResult:
    r = reply.result
    logits = np.frombuffer(r.logits, dtype="<f4").reshape(-1, r.n_vocab) if r.n_vocab \
        else None
    return StepResult(seq=reply.seq, step_id=reply.step_id, accepted=list(r.accepted),
                      next_token=r.next_token, top2_gaps=list(r.top2_gaps), logits=logits)


def error_to_wire(seq: int, step_id: int, code: int, message: str, worker: str
                  ) -> pb.ForwardReply:
    return pb.ForwardReply(seq=seq, step_id=step_id,
                           error=pb.StepError(code=code, message=message, worker=worker))


def timing_to_wire(seq: int, step_id: int, stage_ms: float) -> pb.ForwardReply:
    return pb.ForwardReply(seq=seq, step_id=step_id, stage_ms=stage_ms)


# --- stages and nodes -----------------------------------------------------------------

def load_to_wire(spec: LoadSpec) -> pb.LoadStageRequest:
    msg = pb.LoadStageRequest(
        model_path=spec.model_path, begin=spec.begin, end=spec.end, n_ctx=spec.n_ctx,
        n_seq_max=spec.n_seq_max, type_k=spec.type_k, type_v=spec.type_v,
        flash_attn=spec.flash_attn, n_threads=spec.n_threads,
        wire_dtype=pb.HIDDEN_DTYPE_F16 if spec.wire_f16 else pb.HIDDEN_DTYPE_F32)
    if spec.downstream:
        msg.downstream.CopyFrom(pb.Peer(address=spec.downstream.address,
                                        tls=spec.downstream.tls,
                                        server_name=spec.downstream.server_name))
    return msg


def load_from_wire(msg: pb.LoadStageRequest) -> LoadSpec:
    downstream = Peer(msg.downstream.address, msg.downstream.tls,
                      msg.downstream.server_name) if msg.HasField("downstream") else None
    return LoadSpec(
        model_path=msg.model_path, begin=msg.begin, end=msg.end, n_ctx=msg.n_ctx,
        n_seq_max=msg.n_seq_max or 1, type_k=msg.type_k or "f16",
        type_v=msg.type_v or "f16", flash_attn=msg.flash_attn, n_threads=msg.n_threads,
        downstream=downstream, wire_f16=msg.wire_dtype == pb.HIDDEN_DTYPE_F16)


_PHASES = {"CUT": pb.LoadProgress.CUT, "LOAD": pb.LoadProgress.LOAD,
           "CONNECT": pb.LoadProgress.CONNECT, "READY": pb.LoadProgress.READY}


def progress_to_wire(update: LoadUpdate) -> pb.LoadProgress:
    return pb.LoadProgress(phase=_PHASES[update.phase], fraction=update.fraction,
                           detail=update.detail)


def progress_from_wire(msg: pb.LoadProgress) -> LoadUpdate:
    return LoadUpdate(pb.LoadProgress.Phase.Name(msg.phase), msg.fraction, msg.detail)


def node_to_wire(node: NodeInfo) -> pb.NodeInfo:
    h = node.host
    msg = pb.NodeInfo(
        hostname=h.hostname, pid=h.pid, cpu=h.cpu, cpu_count=h.cpu_count,
        ram_total_bytes=h.ram_total_bytes, ram_available_bytes=h.ram_available_bytes,
        gpus=[pb.Gpu(index=g.index, name=g.name, total_bytes=g.total_bytes,
                     free_bytes=g.free_bytes, utilization_percent=g.utilization_percent,
                     temperature_c=g.temperature_c, driver=g.driver) for g in h.gpus],
        versions=node.versions, gpu_error=h.gpu_error)
    if node.stage:
        s = node.stage
        msg.stage.CopyFrom(pb.StageInfo(
            model_path=s.model_path, begin=s.begin, end=s.end,
            model_n_layer=node.model_n_layer, n_ctx=s.n_ctx, n_seq_max=s.n_seq_max,
            type_k=s.type_k, type_v=s.type_v,
            downstream=s.downstream.address if s.downstream else ""))
    return msg


def node_from_wire(msg: pb.NodeInfo) -> NodeInfo:
    host = HostInfo(
        hostname=msg.hostname, pid=msg.pid, cpu=msg.cpu, cpu_count=msg.cpu_count,
        ram_total_bytes=msg.ram_total_bytes, ram_available_bytes=msg.ram_available_bytes,
        gpus=[GpuInfo(index=g.index, name=g.name, total_bytes=g.total_bytes,
                      free_bytes=g.free_bytes, utilization_percent=g.utilization_percent,
                      temperature_c=g.temperature_c, driver=g.driver) for g in msg.gpus],
        gpu_error=msg.gpu_error)
    stage = None
    if msg.HasField("stage"):
        s = msg.stage
        stage = LoadSpec(model_path=s.model_path, begin=s.begin, end=s.end, n_ctx=s.n_ctx,
                         n_seq_max=s.n_seq_max, type_k=s.type_k, type_v=s.type_v,
                         downstream=Peer(s.downstream) if s.downstream else None)
    return NodeInfo(host=host, versions=dict(msg.versions), stage=stage,
                    model_n_layer=msg.stage.model_n_layer if stage else 0)
