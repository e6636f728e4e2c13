"""The one place where protobuf meets domain objects: every other module deals in those.

Also where a message is checked for shape before any worker acts on it: wrong byte
lengths, non-contiguous positions, inconsistent chunks raise InvalidForward here.
"""

from __future__ import annotations

import functools

import numpy as np

from cluster.errors import InvalidForward, SpecshardError
from cluster.hardware import GpuInfo, HostInfo
from cluster.messages import (
    Activations,
    Batch,
    BatchResult,
    LoadSpec,
    LoadUpdate,
    NodeInfo,
    Peer,
    SeqResult,
    Slice,
    TokenLogprobs,
)
from cluster.rope import RopeParams
from cluster.sampling import SamplingParams, SparseDist
from cluster.wire import worker_pb2 as pb

# Hidden states travel in chunks of CHUNK_BYTES (a 512-row QwQ batch is 10 MB of f32).
# Every channel and server of the ring uses MESSAGE_LIMIT for sending and receiving:
# one limit, so no message one side may send is refused by the other. It also bounds
# what a reply may carry: the judged rows' logits when a test or logprobs ask for them
# (600 KB a row at a 152k vocabulary; `max_logit_rows`).
CHUNK_BYTES = 3 * 1024 * 1024
MESSAGE_LIMIT = 64 * 1024 * 1024
MAX_CHUNKS = 64  # 192 MiB of hidden states: far past any batch (n_batch ≤ 4096 rows)
CHANNEL_OPTIONS: list[tuple[str, int | str]] = [
    ("grpc.max_send_message_length", MESSAGE_LIMIT),
    ("grpc.max_receive_message_length", MESSAGE_LIMIT)]


def max_logit_rows(n_vocab: int) -> int:
    """Rows of logits one reply may carry under MESSAGE_LIMIT (headroom for the rest)."""
    return max((MESSAGE_LIMIT - (1 << 20)) // (4 * max(n_vocab, 1)), 1)
_DTYPES: dict[int, np.dtype] = {
    pb.HIDDEN_DTYPE_F32: np.dtype("<f4"), pb.HIDDEN_DTYPE_F16: np.dtype("<f2")}


# --- sampling -------------------------------------------------------------------------

def sampling_to_wire(params: SamplingParams) -> pb.Sampling:
    # top_k is uint32 on the wire; any k past the vocabulary means no filter, as 0 does.
    return pb.Sampling(
        temperature=params.temperature, top_k=min(params.top_k, 2**32 - 1),
        top_p=params.top_p, min_p=params.min_p, presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty, repeat_penalty=params.repeat_penalty,
        repeat_last_n=params.repeat_last_n, penalty_from=params.penalty_from,
        logit_bias=dict(params.logit_bias),
        logprobs=0 if params.logprobs is None else params.logprobs + 1)


def sampling_from_wire(msg: pb.Sampling) -> SamplingParams:
    # proto3 floats default to 0; top-p 0 means "unset" (1), as it is invalid anyway, and
    # so does a repeat penalty of 0.
    return _sampling(msg.temperature, msg.top_k, msg.top_p or 1.0, msg.min_p,
                     msg.presence_penalty, msg.frequency_penalty, msg.repeat_penalty or 1.0,
                     msg.repeat_last_n, msg.penalty_from,
                     tuple(sorted(msg.logit_bias.items())),
                     msg.logprobs - 1 if msg.logprobs else None)


@functools.lru_cache(maxsize=256)
def _sampling(temperature: float, top_k: int, top_p: float, min_p: float, presence: float,
              frequency: float, repeat: float, last_n: int, penalty_from: int,
              logit_bias: tuple[tuple[int, float], ...], logprobs: int | None
              ) -> SamplingParams:
    """Every step of a request carries the same settings: checked once (a refusal is not
    cached: it raises)."""
    try:
        return SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                              presence_penalty=presence, frequency_penalty=frequency,
                              repeat_penalty=repeat, repeat_last_n=last_n,
                              penalty_from=penalty_from, logit_bias=logit_bias,
                              logprobs=logprobs)
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


# --- batches -------------------------------------------------------------------------

def slice_to_wire(s: Slice) -> pb.Slice:
    return pb.Slice(seq=s.seq, start=s.start, tokens=s.tokens, n_draft=s.n_draft,
                    draft_dists=[dist_to_wire(d) for d in s.draft_dists],
                    sampling=sampling_to_wire(s.sampling), step_seed=s.step_seed,
                    judge=s.judge, return_logits=s.return_logits, masks=s.masks,
                    copy_from=s.copy_from if s.copy_from >= 0 else None,
                    link=s.link if s.link >= 0 else None,
                    chain=s.chain if s.chain >= 0 else None)


def slice_from_wire(msg: pb.Slice) -> Slice:
    n = len(msg.tokens)
    if n and msg.n_draft >= n:
        raise InvalidForward(f"{msg.n_draft} draft guesses in a slice of {n} tokens")
    if not n and (msg.n_draft or msg.draft_dists or msg.judge):
        raise InvalidForward(f"an empty slice of sequence {msg.seq} only truncates: "
                             "no guesses, no verdict")
    link = msg.HasField("link")
    if link and not (n and msg.judge):
        raise InvalidForward(f"a link guess for sequence {msg.seq} needs judged rows")
    n_guesses = msg.n_draft + link  # the link is judged at the last row
    dists = [dist_from_wire(d) for d in msg.draft_dists]
    if dists and len(dists) != n_guesses:
        raise InvalidForward(f"{len(dists)} draft distributions for {n_guesses} guesses")
    sampling = sampling_from_wire(msg.sampling)
    if msg.judge and not sampling.greedy and len(dists) != n_guesses:
        raise InvalidForward("sampled verification needs the draft's distributions")
    if msg.HasField("copy_from") and msg.copy_from == msg.seq:  # without tokens: a move
        raise InvalidForward(f"sequence {msg.seq} cannot copy from itself")
    masks = list(msg.masks)
    if masks and (not msg.judge or len(masks) != msg.n_draft + 1):
        raise InvalidForward(f"{len(masks)} token masks for a slice judging "
                             f"{msg.n_draft + 1 if msg.judge else 0} rows")
    return Slice(seq=msg.seq, start=msg.start, tokens=list(msg.tokens), sampling=sampling,
                 n_draft=msg.n_draft, draft_dists=dists, step_seed=msg.step_seed,
                 judge=msg.judge, return_logits=msg.return_logits, masks=masks,
                 copy_from=msg.copy_from if msg.HasField("copy_from") else -1,
                 link=msg.link if link else -1,
                 chain=msg.chain if msg.HasField("chain") else -1)


def batch_to_wire(acts: Activations, f16: bool = False) -> list[pb.ForwardMessage]:
    """One batch as messages: the first carries the slices, more chunks carry bytes only."""
    b = acts.batch
    head = pb.ForwardMessage(batch_id=b.batch_id, slices=[slice_to_wire(s) for s in b.slices],
                             n_chunks=1, times=[pb.StageTime(stage_ms=s, busy_ms=w)
                                                for s, w in acts.times])
    if acts.hidden is None:
        return [head]
    dtype = _DTYPES[pb.HIDDEN_DTYPE_F16 if f16 else pb.HIDDEN_DTYPE_F32]
    data = np.ascontiguousarray(acts.hidden, dtype=dtype).tobytes()
    head.dtype = pb.HIDDEN_DTYPE_F16 if f16 else pb.HIDDEN_DTYPE_F32
    head.n_embd = acts.hidden.shape[1]
    if len(data) <= CHUNK_BYTES:
        head.hidden = data
        return [head]
    pieces = [data[i:i + CHUNK_BYTES] for i in range(0, len(data), CHUNK_BYTES)]
    head.n_chunks = len(pieces)
    head.hidden = pieces[0]
    rest = [pb.ForwardMessage(batch_id=b.batch_id, hidden=piece, chunk_index=i,
                              n_chunks=len(pieces))
            for i, piece in enumerate(pieces[1:], start=1)]
    return [head, *rest]


class BatchAssembler:
    """Turns the messages of one upstream stream back into batches (chunks in order)."""

    def __init__(self) -> None:
        self._head: pb.ForwardMessage | None = None
        self._pieces: list[bytes] = []

    def add(self, msg: pb.ForwardMessage) -> Activations | None:
        if self._head is None:
            if msg.chunk_index != 0:
                raise InvalidForward(f"chunk {msg.chunk_index} of batch {msg.batch_id} "
                                     "arrived without its first chunk")
            if msg.n_chunks > MAX_CHUNKS:
                raise InvalidForward(f"{msg.n_chunks} chunks: at most {MAX_CHUNKS}")
            self._head, self._pieces = msg, [msg.hidden]
        else:
            head = self._head
            if (msg.batch_id, msg.chunk_index) != (head.batch_id, len(self._pieces)) \
                    or msg.slices:
                self._head, self._pieces = None, []
                raise InvalidForward(f"chunks of batch {head.batch_id} out of order")
            self._pieces.append(msg.hidden)
        if len(self._pieces) < max(self._head.n_chunks, 1):
            return None
        head, pieces = self._head, self._pieces
        self._head, self._pieces = None, []
        return batch_from_wire(head, pieces[0] if len(pieces) == 1 else b"".join(pieces))

    @property
    def pending(self) -> int | None:
        """The batch whose chunks are still arriving, if any."""
        return self._head.batch_id if self._head is not None else None


def batch_from_wire(msg: pb.ForwardMessage, data: bytes) -> Activations:
    if not msg.slices:  # the engine never sends one; it would travel the ring for nothing
        raise InvalidForward(f"batch {msg.batch_id} has no slices")
    slices = [slice_from_wire(s) for s in msg.slices]
    batch = Batch(batch_id=msg.batch_id, slices=slices)
    return Activations(batch, hidden=_hidden_from_wire(msg, data, batch.n_rows),
                       times=[(t.stage_ms, t.busy_ms) for t in msg.times])


def _hidden_from_wire(msg: pb.ForwardMessage, data: bytes, n_rows: int) -> np.ndarray | None:
    if not data and not msg.n_embd:
        return None
    dtype = _DTYPES.get(msg.dtype)
    if dtype is None:
        raise InvalidForward(f"unknown hidden-state dtype {msg.dtype}")
    want = n_rows * msg.n_embd * dtype.itemsize
    if msg.n_embd == 0 or len(data) != want:
        raise InvalidForward(f"hidden states are {len(data)} bytes; {n_rows} rows × "
                             f"{msg.n_embd} × {dtype.itemsize} bytes = {want}")
    rows = np.frombuffer(data, dtype=dtype).reshape(n_rows, msg.n_embd)
    return rows if dtype == np.float32 else rows.astype(np.float32)


def result_to_wire(result: BatchResult, stage_ms: float) -> pb.ForwardReply:
    """The last worker's reply; `result.times` are the workers' before it."""
    out = []
    for r in result.results:
        msg = pb.SeqResult(seq=r.seq, accepted=r.accepted, next_token=r.next_token,
                           top2_gaps=r.top2_gaps, error=r.error, skipped=r.skipped,
                           logprobs=[pb.TokenLogprobs(
                               logprob=t.logprob, top_ids=[i for i, _ in t.top],
                               top_logprobs=[lp for _, lp in t.top]) for t in r.logprobs])
        if r.logits is not None:
            msg.logits = np.ascontiguousarray(r.logits, dtype="<f4").tobytes()
            msg.n_vocab = r.logits.shape[1]
        out.append(msg)
    return pb.ForwardReply(batch_id=result.batch_id, stage_ms=stage_ms,
                           result=pb.BatchResult(results=out),
                           times=[pb.StageTime(stage_ms=s, busy_ms=w) for s, w in result.times])


def result_from_wire(reply: pb.ForwardReply) -> BatchResult:
    results = []
    for r in reply.result.results:
        logits = np.frombuffer(r.logits, dtype="<f4").reshape(-1, r.n_vocab) if r.n_vocab \
            else None
        results.append(SeqResult(seq=r.seq, accepted=list(r.accepted),
                                 next_token=r.next_token, top2_gaps=list(r.top2_gaps),
                                 logits=logits, error=r.error, skipped=r.skipped,
                                 logprobs=[TokenLogprobs(t.logprob, list(zip(
                                     t.top_ids, t.top_logprobs, strict=True)))
                                     for t in r.logprobs]))
    times = [(t.stage_ms, t.busy_ms) for t in reply.times]
    return BatchResult(batch_id=reply.batch_id, results=results,
                       times=[*times, (reply.stage_ms, 0.0)])


def error_to_wire(batch_id: int, code: int, message: str, worker: str) -> pb.ForwardReply:
    return pb.ForwardReply(batch_id=batch_id,
                           error=pb.StepError(code=code, message=message, worker=worker))



# --- stages and nodes -----------------------------------------------------------------

def load_to_wire(spec: LoadSpec) -> pb.LoadStageRequest:
    msg = pb.LoadStageRequest(
        model_path=spec.model_path, begin=spec.begin, end=spec.end, n_ctx=spec.n_ctx,
        n_seq_max=spec.n_seq_max, type_k=spec.type_k, type_v=spec.type_v,
        flash_attn=spec.flash_attn, n_threads=spec.n_threads,
        wire_dtype=pb.HIDDEN_DTYPE_F16 if spec.wire_f16 else pb.HIDDEN_DTYPE_F32)
    if spec.rope is not None:
        msg.rope.CopyFrom(rope_to_wire(spec.rope))
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
        downstream=downstream, wire_f16=msg.wire_dtype == pb.HIDDEN_DTYPE_F16,
        rope=rope_from_wire(msg.rope) if msg.HasField("rope") else None)


def rope_to_wire(rope: RopeParams) -> pb.RopeScaling:
    return pb.RopeScaling(
        scaling=rope.scaling, freq_base=rope.freq_base, freq_scale=rope.freq_scale,
        yarn_orig_ctx=rope.yarn_orig_ctx, yarn_ext_factor=rope.yarn_ext_factor,
        yarn_attn_factor=rope.yarn_attn_factor, yarn_beta_fast=rope.yarn_beta_fast,
        yarn_beta_slow=rope.yarn_beta_slow)


def rope_from_wire(msg: pb.RopeScaling) -> RopeParams:
    try:
        return RopeParams(
            scaling=msg.scaling, freq_base=msg.freq_base, freq_scale=msg.freq_scale,
            yarn_orig_ctx=msg.yarn_orig_ctx, yarn_ext_factor=msg.yarn_ext_factor,
            yarn_attn_factor=msg.yarn_attn_factor, yarn_beta_fast=msg.yarn_beta_fast,
            yarn_beta_slow=msg.yarn_beta_slow)
    except SpecshardError as exc:
        raise InvalidForward(str(exc)) from exc


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
            downstream=s.downstream.address if s.downstream else "", capture=node.capture))
        if s.rope is not None:
            msg.stage.rope.CopyFrom(rope_to_wire(s.rope))
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
                         downstream=Peer(s.downstream) if s.downstream else None,
                         rope=rope_from_wire(s.rope) if s.HasField("rope") else None)
    return NodeInfo(host=host, versions=dict(msg.versions), stage=stage,
                    model_n_layer=msg.stage.model_n_layer if stage else 0,
                    capture=msg.stage.capture if stage else "")
