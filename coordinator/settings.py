"""`specshard serve` configuration: one pydantic-settings model is the single source of
truth — the command-line flags, the `SPECSHARD_*` environment variables and the
defaults all derive from these fields (flags win over the environment)."""

from __future__ import annotations

import argparse
from typing import Any

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from coordinator.speculation.gamma import SPEC_DEPTH_HELP


class ServeSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SPECSHARD_", extra="ignore")

    model: str = Field("demo", description="target GGUF, or 'demo'")
    draft: str | None = Field(None, description="draft GGUF for speculative decoding, or "
                                                "'demo'")
    draft_mode: str = Field("auto", description="model, ngram, none, or auto (model when "
                                                "--draft is given)")
    ray: str | None = Field(None, description="Ray cluster address ('auto' = the running "
                                              "one); one worker per GPU")
    local_workers: int = Field(0, description="start a local Ray instance with N workers")
    worker: list[str] = Field(default_factory=list,
                              description="use a running worker HOST:PORT (repeat, in order)")
    workers: int | None = Field(None, description="with --ray: how many workers (default: "
                                                  "one per GPU)")
    token_file: str | None = Field(None, description="the workers' token (with --worker)")
    tls_cert: str | None = Field(None, description="this coordinator's certificate, for "
                                                   "workers that use TLS")
    tls_key: str | None = Field(None, description="its private key")
    tls_ca: str | None = Field(None, description="the CA that signed the workers' "
                                                 "certificates")
    ctx: int = Field(4096, description="context per sequence")
    parallel: int = Field(1, description="sequences decoded at once")
    queue_size: int = Field(16, description="requests allowed to wait for a sequence")
    host: str = Field("127.0.0.1", description="HTTP address (beyond loopback needs an API "
                                               "key)")
    port: int = Field(8000, description="HTTP port")
    api_key: str | None = Field(None, description="API key clients must send (prefer "
                                                  "SPECSHARD_API_KEY or --api-key-file)")
    api_key_file: str | None = Field(None, description="file holding the API key")
    threads: int = Field(1, description="llama.cpp threads per worker")
    gamma: int | None = Field(None, description="fixed draft length (default: adaptive)")
    gamma_max: int = Field(16, description="adaptive draft length's upper bound")
    spec_depth: int | None = Field(None, description=SPEC_DEPTH_HELP)
    max_batch_tokens: int = Field(512, description="rows per micro-batch while sequences "
                                                   "decode (bounds their inter-token "
                                                   "latency when a prompt arrives)")
    prefill_chunk: int = Field(256, description="prompt tokens per chunk")
    max_stall: float = Field(2.0, description="a batch with prompt rows lasts at most this "
                                              "many decode-only batches (by the ring's "
                                              "costs, measured at start); twice that "
                                              "for a prompt that finishes in it")
    micro_batches: int | None = Field(None, description="micro-batches in flight (default: "
                                                        "the number of stages)")
    name: str = Field("", description="model name in the API (default: the file's stem)")
    alias: list[str] = Field(default_factory=list,
                             description="another name /v1/models lists and "
                                         "--strict-model-name accepts (repeat)")
    reasoning_format: str = Field("deepseek", description="deepseek: a reasoning model's "
                                  "thinking goes to reasoning_content, apart from content "
                                  "(as llama-server); none: the raw text")
    reasoning_budget: int = Field(-1, description="thinking tokens per reply (-1: unlimited, "
                                                  "0: no thinking); a request may set "
                                                  "thinking_budget_tokens")
    chat_template_file: str | None = Field(None, description="a Jinja chat template to use "
                                                             "instead of the model's")
    # --- llama-server's flags: RoPE scaling (cluster/rope.py) and sampling defaults
    # (coordinator/api/sampling_defaults.py); unset: the GGUF's own values, if any.
    rope_scaling: str | None = Field(None, description="RoPE scaling: none, linear or yarn "
                                                       "(default: the model's)")
    rope_scale: float | None = Field(None, description="RoPE context scaling factor: the "
                                                       "trained context × N")
    rope_freq_base: float | None = Field(None, description="RoPE base frequency (default: "
                                                           "the model's)")
    rope_freq_scale: float | None = Field(None, description="RoPE frequency scaling factor "
                                                            "(1/N; wins over --rope-scale)")
    yarn_orig_ctx: int | None = Field(None, description="YaRN: the model's original context "
                                                        "(default: its trained context)")
    yarn_ext_factor: float | None = Field(None, description="YaRN: extrapolation mix factor "
                                                            "(default 1 with yarn)")
    yarn_attn_factor: float | None = Field(None, description="YaRN: attention magnitude "
                                                             "scale")
    yarn_beta_fast: float | None = Field(None, description="YaRN: low correction dim "
                                                            "(default 32)")
    yarn_beta_slow: float | None = Field(None, description="YaRN: high correction dim "
                                                            "(default 1)")
    temp: float | None = Field(None, description="default temperature for requests that "
                                                 "send none (default: the GGUF's "
                                                 "general.sampling.temp, else 1.0)")
    top_p: float | None = Field(None, description="default top-p (1.0 = off)")
    top_k: int | None = Field(None, description="default top-k (0 = off)")
    min_p: float | None = Field(None, description="default min-p (0 = off)")
    presence_penalty: float | None = Field(None, description="default presence penalty")
    frequency_penalty: float | None = Field(None, description="default frequency penalty")
    repeat_penalty: float | None = Field(None, description="default repeat penalty (1 = "
                                                           "off)")
    repeat_last_n: int | None = Field(None, description="tokens the penalties look back "
                                                        "over (default 64; -1: the whole "
                                                        "context)")
    strict_model_name: bool = Field(False, description="answer 404 to a request naming "
                                                       "another model (default: any name "
                                                       "is served by the one model, as "
                                                       "llama-server does)")
    cache_prompt: bool = Field(True, description="keep a finished request's caches in "
                                                 "its slot, and start a new request from "
                                                 "the slot sharing its longest prefix")
    share_prefix: bool = Field(True, description="copy a prompt prefix another slot holds "
                                                 "(a shared system prompt) on every stage "
                                                 "instead of computing it again (with "
                                                 "--cache-prompt)")
    drain_timeout: float = Field(30.0, description="on SIGTERM/SIGINT: seconds running "
                                                   "requests get to finish before they are "
                                                   "ended (finish_reason 'abort')")
    worker_wait: float = Field(120.0, description="with --worker: seconds to wait for a lost "
                                                  "worker to answer again before the ring "
                                                  "is reported down (it is retried)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """One flag per field; unset flags fall through to SPECSHARD_* and the defaults."""
    for name, field in ServeSettings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        kwargs: dict[str, Any] = {"help": field.description, "default": None}
        if name == "worker":
            kwargs.update(action="append", metavar="HOST:PORT")
        elif name == "alias":
            kwargs.update(action="append", metavar="NAME")
        elif name == "ray":
            kwargs.update(nargs="?", const="auto", metavar="ADDRESS")
        elif field.annotation in (int, int | None):
            kwargs["type"] = int
        elif field.annotation in (float, float | None):
            kwargs["type"] = float
        elif field.annotation is bool:  # --flag / --no-flag
            kwargs["action"] = argparse.BooleanOptionalAction
        p.add_argument(flag, **kwargs)


def from_args(args: argparse.Namespace) -> ServeSettings:
    given = {name: getattr(args, name) for name in ServeSettings.model_fields
             if getattr(args, name, None) is not None}
    return ServeSettings(**given)
