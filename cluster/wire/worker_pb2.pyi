from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class HiddenDType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    HIDDEN_DTYPE_F32: _ClassVar[HiddenDType]
    HIDDEN_DTYPE_F16: _ClassVar[HiddenDType]
HIDDEN_DTYPE_F32: HiddenDType
HIDDEN_DTYPE_F16: HiddenDType

class NodeInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Gpu(_message.Message):
    __slots__ = ("index", "name", "total_bytes", "free_bytes", "utilization_percent", "temperature_c", "driver")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    UTILIZATION_PERCENT_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_C_FIELD_NUMBER: _ClassVar[int]
    DRIVER_FIELD_NUMBER: _ClassVar[int]
    index: int
    name: str
    total_bytes: int
    free_bytes: int
    utilization_percent: int
    temperature_c: int
    driver: str
    def __init__(self, index: _Optional[int] = ..., name: _Optional[str] = ..., total_bytes: _Optional[int] = ..., free_bytes: _Optional[int] = ..., utilization_percent: _Optional[int] = ..., temperature_c: _Optional[int] = ..., driver: _Optional[str] = ...) -> None: ...

class StageInfo(_message.Message):
    __slots__ = ("model_path", "begin", "end", "model_n_layer", "n_ctx", "n_seq_max", "type_k", "type_v", "downstream", "capture", "rope")
    MODEL_PATH_FIELD_NUMBER: _ClassVar[int]
    BEGIN_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    MODEL_N_LAYER_FIELD_NUMBER: _ClassVar[int]
    N_CTX_FIELD_NUMBER: _ClassVar[int]
    N_SEQ_MAX_FIELD_NUMBER: _ClassVar[int]
    TYPE_K_FIELD_NUMBER: _ClassVar[int]
    TYPE_V_FIELD_NUMBER: _ClassVar[int]
    DOWNSTREAM_FIELD_NUMBER: _ClassVar[int]
    CAPTURE_FIELD_NUMBER: _ClassVar[int]
    ROPE_FIELD_NUMBER: _ClassVar[int]
    model_path: str
    begin: int
    end: int
    model_n_layer: int
    n_ctx: int
    n_seq_max: int
    type_k: str
    type_v: str
    downstream: str
    capture: str
    rope: RopeScaling
    def __init__(self, model_path: _Optional[str] = ..., begin: _Optional[int] = ..., end: _Optional[int] = ..., model_n_layer: _Optional[int] = ..., n_ctx: _Optional[int] = ..., n_seq_max: _Optional[int] = ..., type_k: _Optional[str] = ..., type_v: _Optional[str] = ..., downstream: _Optional[str] = ..., capture: _Optional[str] = ..., rope: _Optional[_Union[RopeScaling, _Mapping]] = ...) -> None: ...

class NodeInfo(_message.Message):
    __slots__ = ("hostname", "pid", "cpu", "cpu_count", "ram_total_bytes", "ram_available_bytes", "gpus", "versions", "stage", "gpu_error")
    class VersionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    CPU_FIELD_NUMBER: _ClassVar[int]
    CPU_COUNT_FIELD_NUMBER: _ClassVar[int]
    RAM_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    RAM_AVAILABLE_BYTES_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    GPU_ERROR_FIELD_NUMBER: _ClassVar[int]
    hostname: str
    pid: int
    cpu: str
    cpu_count: int
    ram_total_bytes: int
    ram_available_bytes: int
    gpus: _containers.RepeatedCompositeFieldContainer[Gpu]
    versions: _containers.ScalarMap[str, str]
    stage: StageInfo
    gpu_error: str
    def __init__(self, hostname: _Optional[str] = ..., pid: _Optional[int] = ..., cpu: _Optional[str] = ..., cpu_count: _Optional[int] = ..., ram_total_bytes: _Optional[int] = ..., ram_available_bytes: _Optional[int] = ..., gpus: _Optional[_Iterable[_Union[Gpu, _Mapping]]] = ..., versions: _Optional[_Mapping[str, str]] = ..., stage: _Optional[_Union[StageInfo, _Mapping]] = ..., gpu_error: _Optional[str] = ...) -> None: ...

class Peer(_message.Message):
    __slots__ = ("address", "tls", "server_name")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    TLS_FIELD_NUMBER: _ClassVar[int]
    SERVER_NAME_FIELD_NUMBER: _ClassVar[int]
    address: str
    tls: bool
    server_name: str
    def __init__(self, address: _Optional[str] = ..., tls: _Optional[bool] = ..., server_name: _Optional[str] = ...) -> None: ...

class LoadStageRequest(_message.Message):
    __slots__ = ("model_path", "begin", "end", "n_ctx", "n_seq_max", "type_k", "type_v", "flash_attn", "n_threads", "downstream", "wire_dtype", "rope")
    MODEL_PATH_FIELD_NUMBER: _ClassVar[int]
    BEGIN_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    N_CTX_FIELD_NUMBER: _ClassVar[int]
    N_SEQ_MAX_FIELD_NUMBER: _ClassVar[int]
    TYPE_K_FIELD_NUMBER: _ClassVar[int]
    TYPE_V_FIELD_NUMBER: _ClassVar[int]
    FLASH_ATTN_FIELD_NUMBER: _ClassVar[int]
    N_THREADS_FIELD_NUMBER: _ClassVar[int]
    DOWNSTREAM_FIELD_NUMBER: _ClassVar[int]
    WIRE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    ROPE_FIELD_NUMBER: _ClassVar[int]
    model_path: str
    begin: int
    end: int
    n_ctx: int
    n_seq_max: int
    type_k: str
    type_v: str
    flash_attn: bool
    n_threads: int
    downstream: Peer
    wire_dtype: HiddenDType
    rope: RopeScaling
    def __init__(self, model_path: _Optional[str] = ..., begin: _Optional[int] = ..., end: _Optional[int] = ..., n_ctx: _Optional[int] = ..., n_seq_max: _Optional[int] = ..., type_k: _Optional[str] = ..., type_v: _Optional[str] = ..., flash_attn: _Optional[bool] = ..., n_threads: _Optional[int] = ..., downstream: _Optional[_Union[Peer, _Mapping]] = ..., wire_dtype: _Optional[_Union[HiddenDType, str]] = ..., rope: _Optional[_Union[RopeScaling, _Mapping]] = ...) -> None: ...

class RopeScaling(_message.Message):
    __slots__ = ("scaling", "freq_base", "freq_scale", "yarn_orig_ctx", "yarn_ext_factor", "yarn_attn_factor", "yarn_beta_fast", "yarn_beta_slow")
    SCALING_FIELD_NUMBER: _ClassVar[int]
    FREQ_BASE_FIELD_NUMBER: _ClassVar[int]
    FREQ_SCALE_FIELD_NUMBER: _ClassVar[int]
    YARN_ORIG_CTX_FIELD_NUMBER: _ClassVar[int]
    YARN_EXT_FACTOR_FIELD_NUMBER: _ClassVar[int]
    YARN_ATTN_FACTOR_FIELD_NUMBER: _ClassVar[int]
    YARN_BETA_FAST_FIELD_NUMBER: _ClassVar[int]
    YARN_BETA_SLOW_FIELD_NUMBER: _ClassVar[int]
    scaling: str
    freq_base: float
    freq_scale: float
    yarn_orig_ctx: int
    yarn_ext_factor: float
    yarn_attn_factor: float
    yarn_beta_fast: float
    yarn_beta_slow: float
    def __init__(self, scaling: _Optional[str] = ..., freq_base: _Optional[float] = ..., freq_scale: _Optional[float] = ..., yarn_orig_ctx: _Optional[int] = ..., yarn_ext_factor: _Optional[float] = ..., yarn_attn_factor: _Optional[float] = ..., yarn_beta_fast: _Optional[float] = ..., yarn_beta_slow: _Optional[float] = ...) -> None: ...

class LoadProgress(_message.Message):
    __slots__ = ("phase", "fraction", "detail")
    class Phase(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        PHASE_UNSPECIFIED: _ClassVar[LoadProgress.Phase]
        CUT: _ClassVar[LoadProgress.Phase]
        LOAD: _ClassVar[LoadProgress.Phase]
        CONNECT: _ClassVar[LoadProgress.Phase]
        READY: _ClassVar[LoadProgress.Phase]
    PHASE_UNSPECIFIED: LoadProgress.Phase
    CUT: LoadProgress.Phase
    LOAD: LoadProgress.Phase
    CONNECT: LoadProgress.Phase
    READY: LoadProgress.Phase
    PHASE_FIELD_NUMBER: _ClassVar[int]
    FRACTION_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    phase: LoadProgress.Phase
    fraction: float
    detail: str
    def __init__(self, phase: _Optional[_Union[LoadProgress.Phase, str]] = ..., fraction: _Optional[float] = ..., detail: _Optional[str] = ...) -> None: ...

class Sampling(_message.Message):
    __slots__ = ("temperature", "top_k", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repeat_penalty", "repeat_last_n", "penalty_from", "logit_bias", "logprobs")
    class LogitBiasEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: float
        def __init__(self, key: _Optional[int] = ..., value: _Optional[float] = ...) -> None: ...
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    MIN_P_FIELD_NUMBER: _ClassVar[int]
    PRESENCE_PENALTY_FIELD_NUMBER: _ClassVar[int]
    FREQUENCY_PENALTY_FIELD_NUMBER: _ClassVar[int]
    REPEAT_PENALTY_FIELD_NUMBER: _ClassVar[int]
    REPEAT_LAST_N_FIELD_NUMBER: _ClassVar[int]
    PENALTY_FROM_FIELD_NUMBER: _ClassVar[int]
    LOGIT_BIAS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_k: int
    top_p: float
    min_p: float
    presence_penalty: float
    frequency_penalty: float
    repeat_penalty: float
    repeat_last_n: int
    penalty_from: int
    logit_bias: _containers.ScalarMap[int, float]
    logprobs: int
    def __init__(self, temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., min_p: _Optional[float] = ..., presence_penalty: _Optional[float] = ..., frequency_penalty: _Optional[float] = ..., repeat_penalty: _Optional[float] = ..., repeat_last_n: _Optional[int] = ..., penalty_from: _Optional[int] = ..., logit_bias: _Optional[_Mapping[int, float]] = ..., logprobs: _Optional[int] = ...) -> None: ...

class SparseDist(_message.Message):
    __slots__ = ("ids", "probs")
    IDS_FIELD_NUMBER: _ClassVar[int]
    PROBS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    probs: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, ids: _Optional[_Iterable[int]] = ..., probs: _Optional[_Iterable[float]] = ...) -> None: ...

class Slice(_message.Message):
    __slots__ = ("seq", "start", "tokens", "n_draft", "draft_dists", "sampling", "step_seed", "judge", "return_logits", "copy_from", "masks", "link", "chain")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    N_DRAFT_FIELD_NUMBER: _ClassVar[int]
    DRAFT_DISTS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    STEP_SEED_FIELD_NUMBER: _ClassVar[int]
    JUDGE_FIELD_NUMBER: _ClassVar[int]
    RETURN_LOGITS_FIELD_NUMBER: _ClassVar[int]
    COPY_FROM_FIELD_NUMBER: _ClassVar[int]
    MASKS_FIELD_NUMBER: _ClassVar[int]
    LINK_FIELD_NUMBER: _ClassVar[int]
    CHAIN_FIELD_NUMBER: _ClassVar[int]
    seq: int
    start: int
    tokens: _containers.RepeatedScalarFieldContainer[int]
    n_draft: int
    draft_dists: _containers.RepeatedCompositeFieldContainer[SparseDist]
    sampling: Sampling
    step_seed: int
    judge: bool
    return_logits: bool
    copy_from: int
    masks: _containers.RepeatedScalarFieldContainer[bytes]
    link: int
    chain: int
    def __init__(self, seq: _Optional[int] = ..., start: _Optional[int] = ..., tokens: _Optional[_Iterable[int]] = ..., n_draft: _Optional[int] = ..., draft_dists: _Optional[_Iterable[_Union[SparseDist, _Mapping]]] = ..., sampling: _Optional[_Union[Sampling, _Mapping]] = ..., step_seed: _Optional[int] = ..., judge: _Optional[bool] = ..., return_logits: _Optional[bool] = ..., copy_from: _Optional[int] = ..., masks: _Optional[_Iterable[bytes]] = ..., link: _Optional[int] = ..., chain: _Optional[int] = ...) -> None: ...

class ForwardMessage(_message.Message):
    __slots__ = ("batch_id", "slices", "hidden", "dtype", "n_embd", "chunk_index", "n_chunks", "times")
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    SLICES_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    N_EMBD_FIELD_NUMBER: _ClassVar[int]
    CHUNK_INDEX_FIELD_NUMBER: _ClassVar[int]
    N_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    TIMES_FIELD_NUMBER: _ClassVar[int]
    batch_id: int
    slices: _containers.RepeatedCompositeFieldContainer[Slice]
    hidden: bytes
    dtype: HiddenDType
    n_embd: int
    chunk_index: int
    n_chunks: int
    times: _containers.RepeatedCompositeFieldContainer[StageTime]
    def __init__(self, batch_id: _Optional[int] = ..., slices: _Optional[_Iterable[_Union[Slice, _Mapping]]] = ..., hidden: _Optional[bytes] = ..., dtype: _Optional[_Union[HiddenDType, str]] = ..., n_embd: _Optional[int] = ..., chunk_index: _Optional[int] = ..., n_chunks: _Optional[int] = ..., times: _Optional[_Iterable[_Union[StageTime, _Mapping]]] = ...) -> None: ...

class StageTime(_message.Message):
    __slots__ = ("stage_ms", "busy_ms")
    STAGE_MS_FIELD_NUMBER: _ClassVar[int]
    BUSY_MS_FIELD_NUMBER: _ClassVar[int]
    stage_ms: float
    busy_ms: float
    def __init__(self, stage_ms: _Optional[float] = ..., busy_ms: _Optional[float] = ...) -> None: ...

class SeqResult(_message.Message):
    __slots__ = ("seq", "accepted", "next_token", "top2_gaps", "logits", "n_vocab", "error", "logprobs", "skipped")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    NEXT_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TOP2_GAPS_FIELD_NUMBER: _ClassVar[int]
    LOGITS_FIELD_NUMBER: _ClassVar[int]
    N_VOCAB_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_FIELD_NUMBER: _ClassVar[int]
    seq: int
    accepted: _containers.RepeatedScalarFieldContainer[int]
    next_token: int
    top2_gaps: _containers.RepeatedScalarFieldContainer[float]
    logits: bytes
    n_vocab: int
    error: str
    logprobs: _containers.RepeatedCompositeFieldContainer[TokenLogprobs]
    skipped: bool
    def __init__(self, seq: _Optional[int] = ..., accepted: _Optional[_Iterable[int]] = ..., next_token: _Optional[int] = ..., top2_gaps: _Optional[_Iterable[float]] = ..., logits: _Optional[bytes] = ..., n_vocab: _Optional[int] = ..., error: _Optional[str] = ..., logprobs: _Optional[_Iterable[_Union[TokenLogprobs, _Mapping]]] = ..., skipped: _Optional[bool] = ...) -> None: ...

class TokenLogprobs(_message.Message):
    __slots__ = ("logprob", "top_ids", "top_logprobs")
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    TOP_IDS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    logprob: float
    top_ids: _containers.RepeatedScalarFieldContainer[int]
    top_logprobs: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, logprob: _Optional[float] = ..., top_ids: _Optional[_Iterable[int]] = ..., top_logprobs: _Optional[_Iterable[float]] = ...) -> None: ...

class BatchResult(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[SeqResult]
    def __init__(self, results: _Optional[_Iterable[_Union[SeqResult, _Mapping]]] = ...) -> None: ...

class StepError(_message.Message):
    __slots__ = ("code", "message", "worker")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    worker: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ..., worker: _Optional[str] = ...) -> None: ...

class ForwardReply(_message.Message):
    __slots__ = ("batch_id", "result", "error", "stage_ms", "times")
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    STAGE_MS_FIELD_NUMBER: _ClassVar[int]
    TIMES_FIELD_NUMBER: _ClassVar[int]
    batch_id: int
    result: BatchResult
    error: StepError
    stage_ms: float
    times: _containers.RepeatedCompositeFieldContainer[StageTime]
    def __init__(self, batch_id: _Optional[int] = ..., result: _Optional[_Union[BatchResult, _Mapping]] = ..., error: _Optional[_Union[StepError, _Mapping]] = ..., stage_ms: _Optional[float] = ..., times: _Optional[_Iterable[_Union[StageTime, _Mapping]]] = ...) -> None: ...

class ResultsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TruncateRequest(_message.Message):
    __slots__ = ("seqs", "length")
    SEQS_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    seqs: _containers.RepeatedScalarFieldContainer[int]
    length: int
    def __init__(self, seqs: _Optional[_Iterable[int]] = ..., length: _Optional[int] = ...) -> None: ...

class TruncateReply(_message.Message):
    __slots__ = ("lengths",)
    LENGTHS_FIELD_NUMBER: _ClassVar[int]
    lengths: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, lengths: _Optional[_Iterable[int]] = ...) -> None: ...
