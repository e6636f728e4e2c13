"""RoPE scaling: llama-server's flags resolved against the GGUF, carried to every stage.

On the demo target with YaRN flags, 1, 2 and 3 stages compute bit for bit what one
llama.cpp context built with the same flags computes (and not what it computes without
them); a worker that reports other RoPE values than the ring's is refused.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import llama_cpp
import numpy as np
import pytest

from cluster.errors import SpecshardError
from cluster.gguf_file import read_header
from cluster.llama.stage import Stage, StageConfig
from cluster.messages import LoadSpec, NodeInfo, Slice
from cluster.rope import (
    RopeFlags,
    RopeParams,
    context_warning,
    resolve_rope,
    rope_from_settings,
)
from cluster.stage_cut import cut_stage, split_at
from coordinator.placement.local import LocalWorkers
from coordinator.placement.plan import check_loaded
from coordinator.ring.grpc_ring import WorkerClient
from coordinator.tokenizer import Tokenizer
from tests.tiny_gguf import write_tiny_model

SPLITS = {1: [], 2: [14], 3: [9, 19]}
N_STEPS = 6
YARN = RopeFlags(scaling="yarn", scale=4.0, yarn_orig_ctx=32768)


def staged_run(model: Path, points: list[int], rope: RopeParams | None, prompt: list[int]
               ) -> list[np.ndarray]:
    """The last-row logits of the prompt, then of N_STEPS greedy steps, through the
    stages of `points` chained in this process."""
    stages = []
    try:
        for spec in split_at(28, points):
            stages.append(Stage(StageConfig(
                cut_stage(model, spec.begin, spec.end), model if spec.is_first else None,
                n_ctx=512, n_threads=2, rope=rope)))

        def forward(piece: Slice) -> np.ndarray:
            hidden = None
            for stage in stages:
                out = stage.forward([piece], hidden)
                if isinstance(out, list):
                    return out[0][-1].copy()
                hidden = out
            raise AssertionError("the last stage returns logits")

        rows = [forward(Slice(0, 0, prompt))]
        for _ in range(N_STEPS):
            token = int(np.argmax(rows[-1]))
            rows.append(forward(Slice(0, len(prompt) + len(rows) - 1, [token])))
        return rows
    finally:
        for stage in stages:
            stage.close()


def llama_run(model: Path, prompt: list[int], **rope: object) -> list[np.ndarray]:
    """The same in one llama.cpp context of the uncut model."""
    llm = llama_cpp.Llama(str(model), n_ctx=512, n_batch=512, n_threads=2, verbose=False,
                          **rope)  # type: ignore[arg-type]
    try:
        def last() -> np.ndarray:
            return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),)).copy()

        llm.eval(prompt)
        rows = [last()]
        for _ in range(N_STEPS):
            llm.eval([int(np.argmax(rows[-1]))])
            rows.append(last())
        return rows
    finally:
        llm.close()


@pytest.fixture(scope="module")
def prompt(demo_target: Path) -> list[int]:
    tokenizer = Tokenizer(demo_target)
    return tokenizer.encode(tokenizer.chat_prompt(
        [{"role": "user", "content": "Explain what a hash map is, in two sentences."}]))


@pytest.fixture(scope="module")
def yarn(demo_target: Path) -> RopeParams:
    return resolve_rope(read_header(demo_target), YARN)


@pytest.fixture(scope="module")
def reference(demo_target: Path, prompt: list[int]) -> list[np.ndarray]:
    """One llama.cpp context given llama-server's flags as llama-server passes them."""
    return llama_run(demo_target, prompt,
                     rope_scaling_type=llama_cpp.LLAMA_ROPE_SCALING_TYPE_YARN,
                     rope_freq_scale=0.25, yarn_orig_ctx=32768)


@pytest.mark.slow
def test_resolved_values_are_the_flags_over_the_models(yarn: RopeParams) -> None:
    assert yarn == RopeParams(scaling="yarn", freq_base=1e6, freq_scale=0.25,
                              yarn_orig_ctx=32768, yarn_ext_factor=1.0)
    assert yarn.max_ctx(32768) == 131072


@pytest.mark.slow
@pytest.mark.parametrize("n_stages", [1, 2, 3])
def test_yarn_stages_equal_one_llama_cpp_context_with_the_flags(
        n_stages: int, demo_target: Path, prompt: list[int], yarn: RopeParams,
        reference: list[np.ndarray]) -> None:
    got = staged_run(demo_target, SPLITS[n_stages], yarn, prompt)
    assert len(got) == len(reference) == N_STEPS + 1
    for i, (a, b) in enumerate(zip(got, reference, strict=True)):
        assert np.array_equal(a, b), f"row {i}: max |Δ| {np.abs(a - b).max()}"


@pytest.mark.slow
def test_yarn_changes_the_logits(demo_target: Path, prompt: list[int],
                                 reference: list[np.ndarray]) -> None:
    plain = staged_run(demo_target, SPLITS[2], None, prompt)
    assert np.abs(plain[0] - reference[0]).max() > 1e-2
    # … and the unscaled stages are llama.cpp without flags, bit for bit.
    assert all(np.array_equal(a, b) for a, b in
               zip(plain, llama_run(demo_target, prompt), strict=True))


# --- resolution, warnings and the refusal, on the tiny model ------------------------------

def test_gguf_rope_metadata_is_the_default_and_flags_win(tmp_path: Path) -> None:
    path = write_tiny_model(tmp_path / "tiny.gguf", n_ctx=4096)
    plain = resolve_rope(read_header(path))
    assert plain == RopeParams(scaling="linear", freq_base=10000.0, freq_scale=1.0,
                               yarn_orig_ctx=4096)
    scaled = write_tiny_model(tmp_path / "yarn.gguf", n_ctx=4096, rope_scaling=("yarn", 4.0,
                                                                                1024))
    from_model = resolve_rope(read_header(scaled))
    assert (from_model.scaling, from_model.freq_scale, from_model.yarn_orig_ctx,
            from_model.yarn_ext_factor) == ("yarn", 0.25, 1024, 1.0)
    flags = RopeFlags(scaling="linear", scale=2.0, freq_base=5e5, yarn_beta_fast=16.0)
    mine = resolve_rope(read_header(scaled), flags)
    assert (mine.scaling, mine.freq_scale, mine.freq_base, mine.yarn_ext_factor,
            mine.yarn_beta_fast) == ("linear", 0.5, 5e5, 0.0, 16.0)
    assert resolve_rope(read_header(scaled), RopeFlags(scaling="none")).freq_scale == 1.0
    with pytest.raises(SpecshardError, match="--rope-scaling is one of"):
        RopeFlags(scaling="ntk")
    with pytest.raises(SpecshardError, match="--rope-scale must be > 0"):
        RopeFlags(scale=0.0)


def test_context_warning() -> None:
    plain = RopeParams(yarn_orig_ctx=32768)
    assert context_warning(16384, 32768, plain) is None
    said = context_warning(65536, 32768, plain)
    assert said is not None and "RoPE is not scaled" in said and "--rope-scale 2" in said
    yarn = RopeParams(scaling="yarn", freq_scale=0.25, yarn_orig_ctx=32768,
                      yarn_ext_factor=1.0)
    assert context_warning(131072, 32768, yarn) is None
    said = context_warning(200000, 32768, yarn)
    assert said is not None and "covers" in said


@pytest.fixture()
def worker() -> Iterator[LocalWorkers]:
    workers = LocalWorkers(1).start()
    try:
        yield workers
    finally:
        workers.stop()


def test_a_worker_reporting_other_rope_values_is_refused(tmp_path: Path,
                                                         worker: LocalWorkers) -> None:
    """The stage reports what it computes with (sent through LoadStage, back through
    GetNodeInfo); the coordinator refuses a ring whose stage differs from the plan."""
    model = write_tiny_model(tmp_path / "tiny.gguf", n_ctx=1024)
    sent = RopeParams(scaling="yarn", freq_base=10000.0, freq_scale=0.5, yarn_orig_ctx=512,
                      yarn_ext_factor=1.0)
    spec = LoadSpec(str(model), 0, 4, n_ctx=256, rope=sent)
    client = WorkerClient(worker.addresses[0], worker.token, None)
    try:
        client.load(spec, lambda *_: None)
        info = client.node_info()
    finally:
        client.close()
    assert info.stage is not None and info.stage.rope == sent
    check_loaded([spec], [info], worker.addresses)  # the same values: accepted
    other = LoadSpec(str(model), 0, 4, n_ctx=256, rope=RopeParams(yarn_orig_ctx=1024))
    with pytest.raises(SpecshardError, match="computes with other RoPE values"):
        check_loaded([other], [info], worker.addresses)


def test_a_rebuilt_ring_with_other_rope_values_is_refused() -> None:
    """A worker restarted after a loss may be another build or host: the rebuilt ring is
    checked as the first one is, and closed when a stage computes with other values."""
    from cluster.hardware import HostInfo
    from coordinator.ring.supervisor import RingSupervisor, StaticWorkers

    sent = RopeParams(scaling="yarn", freq_scale=0.25, yarn_orig_ctx=512,
                      yarn_ext_factor=1.0)
    spec = LoadSpec("tiny.gguf", 0, 4, n_ctx=256, rope=sent)
    answered = LoadSpec("tiny.gguf", 0, 4, n_ctx=256, rope=RopeParams(yarn_orig_ctx=512))

    class Rebuilt:  # what the restarted worker reports after LoadStage
        closed = False

        def connect(self, _sink: object) -> None: ...

        def truncate_all(self, *_args: object) -> None: ...

        def node_infos(self) -> list[NodeInfo]:
            return [NodeInfo(HostInfo("pc1", 1, "cpu", 1, 0, 0), {}, stage=answered)]

        def close(self) -> None:
            self.closed = True

    ring = Rebuilt()
    supervisor = RingSupervisor(StaticWorkers(["a:1"], None, None), Path("tiny.gguf"),
                                "tiny.gguf", 256, 1, 1, specs=[spec])
    supervisor._load = lambda progress=False: ring  # type: ignore[assignment,method-assign,return-value]
    with pytest.raises(SpecshardError, match="computes with other RoPE values"):
        supervisor.rebuild(lambda _event: None)
    assert ring.closed and supervisor.ring is None


def test_serve_takes_llama_servers_flags(tmp_path: Path) -> None:
    import argparse

    from coordinator.api.sampling_defaults import from_settings
    from coordinator.settings import add_arguments, from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    settings = from_args(parser.parse_args([
        "--rope-scaling", "yarn", "--rope-scale", "4", "--yarn-orig-ctx", "1024",
        "--yarn-beta-fast", "16", "--temp", "0.6", "--top-k", "40", "--min-p", "0",
        "--presence-penalty", "1.5", "--repeat-last-n", "-1", "--strict-model-name"]))
    header = read_header(write_tiny_model(tmp_path / "tiny.gguf", n_ctx=4096))
    rope = rope_from_settings(settings, header)
    assert (rope.scaling, rope.freq_scale, rope.yarn_orig_ctx, rope.yarn_beta_fast) == \
        ("yarn", 0.25, 1024, 16.0)
    defaults = from_settings(settings, header)
    assert (defaults.temperature, defaults.top_k, defaults.min_p, defaults.presence_penalty,
            defaults.repeat_last_n) == (0.6, 40, 0.0, 1.5, -1)
    assert settings.strict_model_name
    assert not from_args(parser.parse_args([])).strict_model_name
