"""The sampling a request gets for the fields it does not send: `serve`'s flags (llama-
server's names: --temp, --top-p, --top-k, --min-p, --presence-penalty,
--frequency-penalty, --repeat-penalty, --repeat-last-n), else the GGUF's
`general.sampling.*` keys (llama.cpp's own defaults from a model's metadata,
common/common.cpp), else ours: temperature 1.0 (OpenAI's) over the whole vocabulary, no
penalties. Open WebUI, the openai SDK and LangChain send no sampling fields at all, so for
a model like QwQ these defaults are what its users get.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from cluster.errors import SpecshardError
from cluster.gguf_file import GGUFHeader
from cluster.sampling import SamplingParams

# general.sampling.* key → our field (the keys llama.cpp reads; the others it reads —
# mirostat, xtc, the sampler sequence — have no counterpart here and are ignored).
GGUF_KEYS = {
    "general.sampling.temp": "temperature",
    "general.sampling.top_k": "top_k",
    "general.sampling.top_p": "top_p",
    "general.sampling.min_p": "min_p",
    "general.sampling.penalty_repeat": "repeat_penalty",
    "general.sampling.penalty_last_n": "repeat_last_n",
}
# ServeSettings field (the flag) → our field.
FLAGS = {"temp": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
         "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty",
         "repeat_penalty": "repeat_penalty", "repeat_last_n": "repeat_last_n"}


@dataclass(frozen=True)
class SamplingDefaults:
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    source: tuple[tuple[str, str], ...] = ()  # (field, "flag" | "gguf"): where each came from

    def __post_init__(self) -> None:
        try:  # the same bounds a request's values get
            self.params()
        except SpecshardError as exc:
            raise SpecshardError(f"sampling default: {exc}") from None

    def params(self, **overrides: Any) -> SamplingParams:
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "source"}
        return SamplingParams(**{**values, **overrides})

    def as_dict(self) -> dict[str, object]:
        out = asdict(self)
        out["source"] = dict(self.source)
        return out


def from_gguf(header: GGUFHeader) -> dict[str, float | int]:
    """The `general.sampling.*` values a GGUF carries, by our field name."""
    out: dict[str, float | int] = {}
    for key, name in GGUF_KEYS.items():
        value = header.values.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        out[name] = int(value) if name in ("top_k", "repeat_last_n") else float(value)
    return out


def sampling_defaults(flags: dict[str, Any], header: GGUFHeader | None) -> SamplingDefaults:
    """`flags`: ServeSettings' values by field name (None: not given)."""
    values: dict[str, Any] = {}
    source: dict[str, str] = {}
    if header is not None:
        for name, value in from_gguf(header).items():
            values[name], source[name] = value, "gguf"
    for flag, name in FLAGS.items():
        if flags.get(flag) is not None:
            values[name], source[name] = flags[flag], "flag"
    return SamplingDefaults(**values, source=tuple(sorted(source.items())))


def from_settings(settings: object, header: GGUFHeader | None) -> SamplingDefaults:
    """`serve`'s defaults: its settings' --temp … fields (ServeSettings) over the GGUF's."""
    return sampling_defaults({flag: getattr(settings, flag, None) for flag in FLAGS}, header)
