"""The llama.cpp process of bench/rpc_baseline.py's `run_llama`: one model, many workloads.

    python -m bench.llama_baseline REQUEST.json RESULT.json

Pins itself, registers the rpc-servers it is given (as common/arg.cpp's `--rpc` does),
loads the model once, and runs each workload in a context sized for it. Everything is
greedy and deterministic; only the timings vary between runs.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np

from bench.rpc_baseline import WORKLOADS, Batched, Decode, Prefill, Workload, layer_weights
from bench.rpc_server_child import LIB_DIR

LLAMA_SPLIT_MODE_LAYER = 1  # llama.h: enum llama_split_mode
KV_PAD = 256  # llama-context.cpp pads n_ctx (and n_ctx_seq) to a multiple of 256


def rpc_devices(endpoints: list[str]) -> list[int]:
    """Register the servers as common/arg.cpp's `--rpc` does; return their devices."""
    ggml = ctypes.CDLL(str(LIB_DIR / "libggml.so"))
    ggml.ggml_backend_reg_by_name.argtypes = [ctypes.c_char_p]
    ggml.ggml_backend_reg_by_name.restype = ctypes.c_void_p
    ggml.ggml_backend_register.argtypes = [ctypes.c_void_p]
    ggml.ggml_backend_reg_get_proc_address.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    ggml.ggml_backend_reg_get_proc_address.restype = ctypes.c_void_p
    ggml.ggml_backend_reg_dev_count.argtypes = [ctypes.c_void_p]
    ggml.ggml_backend_reg_dev_count.restype = ctypes.c_size_t
    ggml.ggml_backend_reg_dev_get.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    ggml.ggml_backend_reg_dev_get.restype = ctypes.c_void_p
    rpc_reg = ggml.ggml_backend_reg_by_name(b"RPC")
    address = ggml.ggml_backend_reg_get_proc_address(rpc_reg, b"ggml_backend_rpc_add_server")
    if not rpc_reg or not address:
        raise RuntimeError("this llama.cpp build has no RPC backend")
    add_server = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_char_p)(address)
    devices = []
    for endpoint in endpoints:
        reg = add_server(endpoint.encode())
        if not reg:
            raise RuntimeError(f"rpc-server {endpoint} reports no devices")
        ggml.ggml_backend_register(reg)
        devices += [ggml.ggml_backend_reg_dev_get(reg, i)
                    for i in range(ggml.ggml_backend_reg_dev_count(reg))]
    return devices


def load_model(path: str, endpoints: list[str], n_layer: int) -> Any:
    devices = rpc_devices(endpoints)
    mparams = llama_cpp.llama_model_default_params()
    if devices:
        dev_array = (ctypes.c_void_p * (len(devices) + 1))(*devices, None)
        split = (ctypes.c_float * llama_cpp.llama_max_devices())(
            *layer_weights(n_layer, len(devices)))
        mparams.devices = ctypes.addressof(dev_array)
        mparams.n_gpu_layers = 999
        mparams.split_mode = LLAMA_SPLIT_MODE_LAYER
        mparams.tensor_split = split
    else:
        mparams.n_gpu_layers = 0
    model = llama_cpp.llama_model_load_from_file(path.encode(), mparams)
    if not model:
        raise RuntimeError(f"llama.cpp could not load {path}")
    return model


def new_context(model: Any, w: Workload, threads: int) -> tuple[Any, int]:
    """A context just large enough for `w`; returns it and its n_ctx."""
    prompts = w.prompts if isinstance(w, Batched) else [w.prompt]
    n_gen = 0 if isinstance(w, Prefill) else w.n_tokens
    unified = isinstance(w, Batched) and w.kv_unified
    if unified:  # one stream holds every sequence's cells
        n_ctx = -(-sum(len(p) + n_gen for p in prompts) // KV_PAD) * KV_PAD
    else:  # llama.cpp gives each sequence its own stream of n_ctx / n_seq_max cells
        n_ctx = len(prompts) * -(-max(len(p) + n_gen for p in prompts) // KV_PAD) * KV_PAD
    # n_ctx does not change the numerics: attention spans min(n_ctx, used cells padded
    # to 256) (llama-kv-cache.cpp get_n_kv), so this equals the 1024 our stages use.
    cparams = llama_cpp.llama_context_default_params()
    cparams.n_ctx, cparams.n_seq_max, cparams.kv_unified = n_ctx, len(prompts), unified
    cparams.n_batch, cparams.n_ubatch = w.n_batch, min(w.n_ubatch, w.n_batch)
    cparams.n_threads = cparams.n_threads_batch = threads
    # Our stages run f16 KV without flash attention; the same kernels here make the
    # tokens comparable (auto would pick flash attention on a CPU and round differently).
    cparams.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
    ctx = llama_cpp.llama_init_from_model(model, cparams)
    if not ctx:
        raise RuntimeError("llama.cpp could not create a context")
    return ctx, n_ctx


class Runner:
    """One context and one reusable llama_batch; rows are (token, pos, seq, logits?)."""

    def __init__(self, ctx: Any, model: Any, n_batch: int, margins: bool) -> None:
        self.ctx, self.n_batch, self.margins = ctx, n_batch, margins
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
        self.batch = llama_cpp.llama_batch_init(n_batch, 0, 1)

    def close(self) -> None:
        llama_cpp.llama_batch_free(self.batch)
        llama_cpp.llama_free(self.ctx)

    def decode(self, rows: list[tuple[int, int, int, bool]]) -> None:
        b = self.batch
        b.n_tokens = len(rows)
        for i, (token, pos, seq, out) in enumerate(rows):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = token, pos, 1, out
            b.seq_id[i][0] = seq
        if llama_cpp.llama_decode(self.ctx, b):
            raise RuntimeError("llama_decode failed")

    def pick(self, row: int) -> tuple[int, float]:
        """Greedy token from batch row `row`, and its top-2 gap if margins were asked."""
        ptr = llama_cpp.llama_get_logits_ith(self.ctx, row)
        logits = np.ctypeslib.as_array(ptr, (self.n_vocab,))
        if not self.margins:
            return int(np.argmax(logits)), 0.0
        top = np.partition(logits, -2)[-2:]
        return int(np.argmax(logits)), float(top[1] - top[0])

    def prefill(self, prompt: list[int], seq: int) -> tuple[int, float]:
        """Prompt in n_batch chunks, logits for its last token only (as llama-server)."""
        for start in range(0, len(prompt), self.n_batch):
            chunk = prompt[start:start + self.n_batch]
            self.decode([(t, start + i, seq, start + i == len(prompt) - 1)
                         for i, t in enumerate(chunk)])
        return self.pick((len(prompt) - 1) % self.n_batch)  # its row in the last chunk


def _prefill(run: Runner, prompt: list[int]) -> dict[str, Any]:
    t0 = time.perf_counter()
    token, gap = run.prefill(prompt, 0)
    ttft = time.perf_counter() - t0
    return {"ttft_s": ttft, "prompt_tok_s": len(prompt) / ttft, "n_prompt": len(prompt),
            "first_token": token, "margins": [gap] if run.margins else []}


def _generate(run: Runner, prompts: list[list[int]], n_tokens: int) -> dict[str, Any]:
    """Prefill each sequence, then n_tokens − 1 steps of one llama_decode for all."""
    tokens: list[list[int]] = []
    gaps: list[list[float]] = []
    t0 = time.perf_counter()
    for seq, prompt in enumerate(prompts):
        token, gap = run.prefill(prompt, seq)
        tokens.append([token])
        gaps.append([gap])
    t_first = time.perf_counter()
    for step in range(n_tokens - 1):
        run.decode([(out[-1], len(p) + step, seq, True)
                    for seq, (p, out) in enumerate(zip(prompts, tokens, strict=True))])
        for seq in range(len(prompts)):
            token, gap = run.pick(seq)
            tokens[seq].append(token)
            gaps[seq].append(gap)
    decode_s = time.perf_counter() - t_first
    generated = len(prompts) * (n_tokens - 1)
    return {"decode_tok_s": generated / decode_s if decode_s > 0 else 0.0,
            "decode_s": decode_s, "prefill_s": t_first - t0,
            "prompt_tok_s": sum(map(len, prompts)) / (t_first - t0),
            "tokens": tokens, "margins": gaps if run.margins else []}


def run_workload(model: Any, w: Workload, threads: int) -> dict[str, Any]:
    """Keys: workload, n_ctx, n_seq, kv_unified, n_batch, n_ubatch, and
    prefill: ttft_s, prompt_tok_s, n_prompt, first_token, margins ([gap] or []);
    decode: tokens, decode_tok_s, decode_s, prefill_s, prompt_tok_s, margins;
    batched: the same with tokens and margins one list per sequence, and decode_tok_s
    the aggregate S × (n_tokens − 1) ÷ decode_s."""
    ctx, n_ctx = new_context(model, w, threads)
    run = Runner(ctx, model, w.n_batch, w.margins)
    try:
        if isinstance(w, Prefill):
            result = _prefill(run, w.prompt)
        elif isinstance(w, Decode):
            result = _generate(run, [w.prompt], w.n_tokens)
            result["tokens"] = result["tokens"][0]
            result["margins"] = result["margins"][0] if run.margins else []
        else:
            result = _generate(run, w.prompts, w.n_tokens)
    finally:
        run.close()
    kind = {cls: kind for kind, cls in WORKLOADS.items()}[type(w)]
    n_seq, unified = (len(w.prompts), w.kv_unified) if isinstance(w, Batched) else (1, False)
    return {"workload": kind, "n_ctx": n_ctx, "n_seq": n_seq, "kv_unified": unified,
            "n_batch": w.n_batch,
            "n_ubatch": min(w.n_ubatch, w.n_batch), **result}


def main(request: dict[str, Any]) -> list[dict[str, Any]]:
    """Run a `run_llama` request; one result dict per workload."""
    if request["cpus"]:  # before llama.cpp starts threads, which inherit it
        os.sched_setaffinity(0, set(request["cpus"]))
    llama_cpp.llama_backend_init()
    model = load_model(request["model"], request["endpoints"], request["n_layer"])
    workloads = [WORKLOADS[d.pop("kind")](**d) for d in request["workloads"]]
    try:
        return [run_workload(model, w, request["threads"]) for w in workloads]
    finally:
        llama_cpp.llama_model_free(model)


if __name__ == "__main__":
    req_path, res_path = map(Path, sys.argv[1:3])
    res_path.write_text(json.dumps(main(json.loads(req_path.read_text()))))
