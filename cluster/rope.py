"""RoPE scaling: llama-server's flags, the GGUF's own rope metadata as their defaults, and
one fully resolved set of values that every stage computes with.

A stage is a llama.cpp context over some of the model's layers; each computes rotary
position embeddings itself, so each must be given the same values, or the hidden
states one stage hands the next mean something else to it. The coordinator resolves the
values once (flags over the GGUF's `{arch}.rope.*` keys over llama.cpp's defaults,
exactly as llama.cpp's context resolves them), sends them in LoadStage, and refuses a
stage that reports others.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass
from typing import Any

from cluster.errors import SpecshardError
from cluster.gguf_file import GGUFHeader

SCALING_TYPES = ("none", "linear", "yarn")
# llama.cpp's hparams defaults (src/llama-hparams.h) where the GGUF says nothing.
DEFAULT_FREQ_BASE = 10000.0
DEFAULT_BETA_FAST = 32.0
DEFAULT_BETA_SLOW = 1.0
DEFAULT_ATTN_FACTOR = 1.0


@dataclass(frozen=True)
class RopeFlags:
    """What the operator asked for, llama-server's flags; None: not given."""

    scaling: str | None = None  # --rope-scaling {none,linear,yarn}
    scale: float | None = None  # --rope-scale N: context × N (freq_scale = 1/N)
    freq_base: float | None = None  # --rope-freq-base
    freq_scale: float | None = None  # --rope-freq-scale (wins over --rope-scale)
    yarn_orig_ctx: int | None = None  # --yarn-orig-ctx
    yarn_ext_factor: float | None = None  # --yarn-ext-factor
    yarn_attn_factor: float | None = None  # --yarn-attn-factor
    yarn_beta_fast: float | None = None  # --yarn-beta-fast
    yarn_beta_slow: float | None = None  # --yarn-beta-slow

    def __post_init__(self) -> None:
        if self.scaling is not None and self.scaling not in SCALING_TYPES:
            raise SpecshardError(f"--rope-scaling is one of {', '.join(SCALING_TYPES)}, "
                                 f"not {self.scaling!r}")
        for name in ("scale", "freq_base", "freq_scale"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise SpecshardError(f"--rope-{name.replace('_', '-')} must be > 0, "
                                     f"got {value}")
        if self.yarn_orig_ctx is not None and self.yarn_orig_ctx < 1:
            raise SpecshardError(f"--yarn-orig-ctx must be ≥ 1, got {self.yarn_orig_ctx}")
        for name in ("yarn_ext_factor", "yarn_attn_factor", "yarn_beta_fast",
                     "yarn_beta_slow"):
            value = getattr(self, name)
            if value is not None and not value >= 0:
                raise SpecshardError(f"--{name.replace('_', '-')} must be ≥ 0, got {value}")

    @property
    def given(self) -> bool:
        return any(v is not None for v in asdict(self).values())


@dataclass(frozen=True)
class RopeParams:
    """Resolved values, as llama.cpp's context parameters take them (none left to the
    model: a stage file and the whole model then cannot disagree)."""

    scaling: str = "linear"
    freq_base: float = DEFAULT_FREQ_BASE
    freq_scale: float = 1.0
    yarn_orig_ctx: int = 0
    yarn_ext_factor: float = 0.0
    yarn_attn_factor: float = DEFAULT_ATTN_FACTOR
    yarn_beta_fast: float = DEFAULT_BETA_FAST
    yarn_beta_slow: float = DEFAULT_BETA_SLOW

    def __post_init__(self) -> None:
        if self.scaling not in SCALING_TYPES:
            raise SpecshardError(f"rope scaling is one of {', '.join(SCALING_TYPES)}, "
                                 f"not {self.scaling!r}")
        if not (self.freq_base > 0 and self.freq_scale > 0):
            raise SpecshardError(f"rope freq_base and freq_scale must be > 0, got "
                                 f"{self.freq_base} and {self.freq_scale}")

    @property
    def scaled(self) -> bool:
        """Positions are stretched (linear or YaRN with a factor above 1)."""
        return self.scaling != "none" and self.freq_scale < 1.0

    def max_ctx(self, n_ctx_train: int) -> int:
        """The context these values are meant for: the original one × the factor."""
        if not self.scaled:
            return n_ctx_train
        base = self.yarn_orig_ctx or n_ctx_train
        return max(n_ctx_train, int(round(base / self.freq_scale)))

    def as_dict(self) -> dict[str, object]:
        return asdict(self)

    def describe(self) -> str:
        if not self.scaled:
            return f"rope {self.scaling}, base {self.freq_base:g}"
        text = (f"rope {self.scaling} ×{1 / self.freq_scale:g}, base {self.freq_base:g}, "
                f"original context {self.yarn_orig_ctx}")
        if self.scaling == "yarn":
            text += (f", ext {self.yarn_ext_factor:g}, attn {self.yarn_attn_factor:g}, "
                     f"beta {self.yarn_beta_fast:g}/{self.yarn_beta_slow:g}")
        return text


def _number(values: dict[str, object], key: str) -> float | None:
    value = values.get(key)
    return float(value) if isinstance(value, int | float) else None


def resolve_rope(header: GGUFHeader, flags: RopeFlags = RopeFlags()) -> RopeParams:
    """The values llama.cpp's context would compute with, given these flags and this
    model (src/llama-context.cpp, src/llama-model.cpp): flags first, then the GGUF's
    `{arch}.rope.*` keys, then llama.cpp's defaults."""
    values = header.values
    arch = str(values.get("general.architecture", ""))
    n_ctx_train = int(_number(values, f"{arch}.context_length") or 0)
    model_type = values.get(f"{arch}.rope.scaling.type")
    scaling = flags.scaling or (str(model_type) if model_type else "linear")
    if scaling not in SCALING_TYPES:
        raise SpecshardError(f"{header.path.name}: rope scaling '{scaling}' is not supported "
                             f"(supported: {', '.join(SCALING_TYPES)})")
    factor = _number(values, f"{arch}.rope.scaling.factor") or \
        _number(values, f"{arch}.rope.scale_linear")
    freq_scale = (flags.freq_scale if flags.freq_scale is not None
                  else 1.0 / flags.scale if flags.scale is not None
                  else 1.0 / factor if factor else 1.0)
    if scaling == "none":
        freq_scale = 1.0  # llama.cpp never scales with "none"
    orig = flags.yarn_orig_ctx or int(
        _number(values, f"{arch}.rope.scaling.original_context_length") or n_ctx_train)
    ext = flags.yarn_ext_factor if flags.yarn_ext_factor is not None else (
        1.0 if scaling == "yarn" else 0.0)
    freq_base = flags.freq_base if flags.freq_base is not None else (
        _number(values, f"{arch}.rope.freq_base") or DEFAULT_FREQ_BASE)
    return RopeParams(
        scaling=scaling, freq_base=freq_base, freq_scale=freq_scale, yarn_orig_ctx=orig,
        yarn_ext_factor=ext,
        yarn_attn_factor=(flags.yarn_attn_factor if flags.yarn_attn_factor is not None
                          else DEFAULT_ATTN_FACTOR),
        yarn_beta_fast=(flags.yarn_beta_fast if flags.yarn_beta_fast is not None
                        else DEFAULT_BETA_FAST),
        yarn_beta_slow=(flags.yarn_beta_slow if flags.yarn_beta_slow is not None
                        else DEFAULT_BETA_SLOW))


def context_warning(ctx: int, n_ctx_train: int, rope: RopeParams) -> str | None:
    """What `plan` and `serve` say when the context runs past what the model was trained
    for and nothing scales the positions (or the scaling falls short)."""
    if ctx <= n_ctx_train:
        return None
    if not rope.scaled:
        return (f"--ctx {ctx} exceeds the model's trained context of {n_ctx_train} tokens "
                "and RoPE is not scaled: past it the model's output degrades; use e.g. "
                f"--rope-scaling yarn --rope-scale {-(-ctx // n_ctx_train)} "
                f"--yarn-orig-ctx {n_ctx_train}")
    if ctx > rope.max_ctx(n_ctx_train):
        return (f"--ctx {ctx} exceeds the {rope.max_ctx(n_ctx_train)} tokens this RoPE "
                f"scaling covers ({rope.describe()})")
    return None


def check_same_rope(want: RopeParams, got: RopeParams | None, who: str) -> None:
    """Refuse a stage that computes with other RoPE values than the ring's."""
    if got != want:
        raise SpecshardError(
            f"{who} computes with other RoPE values than the ring: "
            f"{got.describe() if got else 'none reported'} instead of {want.describe()}")


# llama-server's flags: (flag, RopeFlags field, type, help).
FLAGS: tuple[tuple[str, str, type, str], ...] = (
    ("--rope-scaling", "scaling", str, "RoPE scaling: none, linear or yarn (default: the "
                                       "model's)"),
    ("--rope-scale", "scale", float, "RoPE context scaling factor: the context × N"),
    ("--rope-freq-base", "freq_base", float, "RoPE base frequency (default: the model's)"),
    ("--rope-freq-scale", "freq_scale", float, "RoPE frequency scaling factor: the context "
                                               "× 1/N"),
    ("--yarn-orig-ctx", "yarn_orig_ctx", int, "YaRN: the model's original context "
                                              "(default: its trained context)"),
    ("--yarn-ext-factor", "yarn_ext_factor", float, "YaRN: extrapolation mix factor "
                                                    "(default 1 with yarn, 0 = full "
                                                    "interpolation)"),
    ("--yarn-attn-factor", "yarn_attn_factor", float, "YaRN: attention magnitude scale"),
    ("--yarn-beta-fast", "yarn_beta_fast", float, "YaRN: low correction dim (default 32)"),
    ("--yarn-beta-slow", "yarn_beta_slow", float, "YaRN: high correction dim (default 1)"),
)


def add_rope_arguments(p: argparse.ArgumentParser) -> None:
    for flag, field, kind, text in FLAGS:
        extra: dict[str, Any] = {"choices": SCALING_TYPES} if field == "scaling" else {}
        p.add_argument(flag, dest=f"rope_{field}", type=kind, default=None, help=text,
                       **extra)


def rope_flags(args: argparse.Namespace) -> RopeFlags:
    return RopeFlags(**{field: getattr(args, f"rope_{field}", None)
                        for _, field, _, _ in FLAGS})


def rope_from_settings(settings: object, header: GGUFHeader) -> RopeParams:
    """`serve`'s RoPE: its settings' rope_* / yarn_* fields (ServeSettings) over the
    model's header."""
    flags = RopeFlags(**{field: getattr(settings, "rope_" + field if not field.startswith(
        "yarn_") else field, None) for _, field, _, _ in FLAGS})
    return resolve_rope(header, flags)
