"""The memory planner on shape-only QwQ-32B Q4_K_H + Qwen3-0.6B, and against llama.cpp."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from gguf.constants import GGMLQuantizationType

from cluster.cli import main
from cluster.hardware import GpuInfo, HostInfo
from cluster.messages import NodeInfo
from cluster.model_info import KvType, inspect_model
from cluster.planning.cli import parse_node
from cluster.planning.inventory import node_specs
from cluster.planning.memory import compute_bytes, kv_bytes, kv_cells_per_seq, model_shape
from cluster.planning.planner import plan
from cluster.planning.plans import GIB, NodeSpec, Plan
from tests.qwq_fixture import QWEN3_0_6B_Q8_0, QWQ_32B_Q4_K_H, write_shape_only

MIB = 1 << 20


@pytest.fixture(scope="session")
def qwq(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_shape_only(tmp_path_factory.mktemp("qwq") / "qwq-32b-q4_k_h.gguf",
                            QWQ_32B_Q4_K_H)


@pytest.fixture(scope="session")
def qwen3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_shape_only(tmp_path_factory.mktemp("qwen3") / "qwen3-0.6b-q8_0.gguf",
                            QWEN3_0_6B_Q8_0)


def nodes(*gib: float) -> list[NodeSpec]:
    return [NodeSpec(chr(ord("a") + i), int(g * GIB)) for i, g in enumerate(gib)]


def within_capacity(result: Plan) -> bool:
    return all(s.total_bytes <= s.capacity_bytes - result.margin_bytes for s in result.stages)


def tiles(result: Plan) -> bool:
    bounds = [(s.begin, s.end) for s in result.stages]
    return bounds[0][0] == 0 and bounds[-1][1] == result.n_layer and all(
        a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["plan", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_fixture_has_the_model_card_shape(qwq: Path, qwen3: Path) -> None:
    info = inspect_model(qwq)
    assert (info.n_layer, info.n_embd, info.n_head_kv, info.head_dim) == (64, 5120, 8, 128)
    assert info.total_bytes == pytest.approx(17.9e9, rel=0.01)
    assert qwq.stat().st_blocks * 512 < 1 << 24  # a sparse hole, not 17.9 GB on disk
    assert info.kv_bytes_per_token(KvType.F16) == 256 * 1024
    assert inspect_model(qwen3).tied_output


def test_kv_bytes_follow_llama_cpp_padding(qwq: Path) -> None:
    info = inspect_model(qwq)
    assert kv_bytes(info, 64, KvType.F16, 16384, 1) == 4 * GIB
    assert kv_bytes(info, 64, KvType.Q8_0, 16384, 1) == int(4.25 * GIB / 2)
    assert kv_cells_per_seq(1000, 1) == 1024
    assert kv_cells_per_seq(1000, 3) == 1024  # 3000 → 3072 cells, 1024 per sequence


def test_two_4070s_at_16k(capsys: pytest.CaptureFixture[str], qwq: Path, qwen3: Path) -> None:
    args = ["--model", str(qwq), "--draft", str(qwen3), "--node", "a=12GiB,bw=504,coordinator",
            "--node", "b=12GiB,bw=504", "--ctx", "16384"]
    code, out, _ = run(capsys, *args)
    assert code == 0
    assert re.search(r"^f16\s+KV on \d+ of 64 layers: \d+:\d+", out, re.MULTILINE)
    assert "draft Qwen3-0.6B" in out and "on node a" in out
    code, out, _ = run(capsys, *args, "--json")
    doc = json.loads(out)
    assert code == 0 and doc["feasible"] and doc["ctx"] == 16384 and doc["reason"] is None
    margin = doc["margin_bytes"]
    for node in doc["nodes"]:
        assert node["total_bytes"] <= node["capacity_bytes"] - margin
        assert node["total_bytes"] == sum(node[k] for k in (
            "weights_bytes", "kv_bytes", "compute_bytes", "draft_bytes"))
    assert doc["nodes"][0]["layers"][0] == 0 and doc["nodes"][-1]["layers"][1] == 64
    assert doc["draft"]["node"] == "a"


def test_24_plus_12_keeps_f16_everywhere(qwq: Path, qwen3: Path) -> None:
    result = plan(qwq, nodes(24, 12), 16384, draft=qwen3)
    assert result.feasible and within_capacity(result) and tiles(result)
    assert result.f16_layers == 64
    assert result.draft is not None and result.draft.node == "a"  # the one with room


def test_12_12_8_gives_the_small_card_fewer_layers(qwq: Path, qwen3: Path) -> None:
    for specs in (nodes(12, 12, 8), [dataclasses.replace(n, bandwidth_gbs=bw) for n, bw in
                                     zip(nodes(12, 8, 12), (504, 272, 504), strict=True)]):
        result = plan(qwq, specs, 16384, draft=qwen3)
        assert result.feasible and within_capacity(result) and tiles(result)
        small = next(s for s in result.stages if s.capacity_bytes == 8 * GIB)
        assert all(small.end - small.begin < s.end - s.begin
                   for s in result.stages if s is not small)


@pytest.mark.parametrize("sizes", [["12GiB"], ["8GiB", "8GiB"]])
def test_too_little_memory_is_explained(capsys: pytest.CaptureFixture[str], qwq: Path,
                                        sizes: list[str]) -> None:
    args = ["--model", str(qwq), "--ctx", "16384"]
    for i, size in enumerate(sizes):
        args += ["--node", f"n{i}={size}"]
    code, out, err = run(capsys, *args)
    assert code == 2 and "does NOT fit" in out
    assert err.count("\n") == 1 and "short at 16k with q8_0 KV" in err
    assert "add a node with at least" in err
    code, out, err = run(capsys, *args, "--json")
    doc = json.loads(out)
    assert code == 2 and doc["feasible"] is False and doc["reason"] in err


def test_a_near_miss_names_the_context_that_fits(qwq: Path) -> None:
    result = plan(qwq, nodes(10, 10), 16384)
    assert not result.feasible and result.reason is not None
    fits_at = int(re.search(r"fits at (\d+)k?", result.reason).group(1))  # type: ignore[union-attr]
    assert fits_at == result.max_ctx < 16384
    assert plan(qwq, nodes(10, 10), result.max_ctx).feasible


def test_forced_layers_are_kept(capsys: pytest.CaptureFixture[str], qwq: Path) -> None:
    result = plan(qwq, nodes(12, 12), 16384, layers={"a": (0, 30)})
    assert result.feasible and (result.stages[0].begin, result.stages[0].end) == (0, 30)
    code, out, _ = run(capsys, "--model", str(qwq), "--node", "a=12G", "--node", "b=12G",
                       "--ctx", "8192", "--layers", "b=28:64", "--json")
    assert code == 0 and json.loads(out)["nodes"][1]["layers"] == [28, 64]


def _worker(hostname: str, gpu: int) -> NodeInfo:
    """What a worker started with `--gpu` reports: its host, and that one GPU."""
    rtx_4070 = GpuInfo(index=gpu, name="NVIDIA GeForce RTX 4070", total_bytes=12 * GIB,
                       free_bytes=int(11.5 * GIB), utilization_percent=0, temperature_c=35,
                       driver="550.54")
    return NodeInfo(host=HostInfo(hostname=hostname, pid=1000 + gpu, cpu="x86", cpu_count=8,
                                  ram_total_bytes=32 * GIB, ram_available_bytes=24 * GIB,
                                  gpus=[rtx_4070]), versions={})


def test_a_two_gpu_box_is_two_nodes(qwq: Path) -> None:
    """One worker per GPU: each is a node of its own, named after its GPU, exactly the
    nodes `--node` describes by hand (docs/planning.md)."""
    found = node_specs(["10.0.0.1:50051", "10.0.0.1:50052", "10.0.0.2:50051"],
                       [_worker("pc1", 0), _worker("pc1", 1), _worker("pc2", 0)])
    names = ["pc1:gpu0", "pc1:gpu1", "pc2:gpu0"]
    assert found == [parse_node(f"{n}=12GiB,free=11.5GiB,ram=32GiB") for n in names]
    result = plan(qwq, found, 16384)
    assert result.feasible and tiles(result) and within_capacity(result)
    assert [s.name for s in result.stages] == names


def test_workers_that_see_one_gpu_share_it() -> None:
    found = node_specs(["10.0.0.1:50051", "10.0.0.1:50052", "10.0.0.2:50051"],
                       [_worker("pc1", 0), _worker("pc1", 0), _worker("pc2", 0)])
    assert [n.name for n in found] == ["10.0.0.1:50051", "10.0.0.1:50052", "pc2:gpu0"]
    assert [n.capacity_bytes for n in found] == [int(5.75 * GIB)] * 2 + [int(11.5 * GIB)]


def test_a_context_past_training_warns_unless_rope_scales_it(
        capsys: pytest.CaptureFixture[str], qwq: Path) -> None:
    """As llama.cpp: past the trained context it runs, but says the output degrades;
    YaRN covering the context silences it, and the plan names the RoPE values."""
    nodes = ["--node", "a=40G", "--node", "b=40G", "--ctx", "65536"]
    code, out, err = run(capsys, "--model", str(qwq), *nodes)
    assert code == 0
    assert err.startswith("specshard: warning: --ctx 65536 exceeds the model's trained "
                          "context of 40960 tokens and RoPE is not scaled")
    code, out, err = run(capsys, "--model", str(qwq), *nodes, "--rope-scaling", "yarn",
                         "--rope-scale", "4", "--yarn-orig-ctx", "32768")
    assert code == 0 and err == ""
    assert "rope yarn ×4, base 1e+06, original context 32768" in out
    code, out, err = run(capsys, "--model", str(qwq), *nodes, "--rope-scaling", "yarn",
                         "--rope-scale", "1.5", "--yarn-orig-ctx", "32768")
    assert "exceeds the 49152 tokens this RoPE scaling covers" in err


@pytest.mark.parametrize("args, message", [
    (["--node", "a=0GiB"], "memory must be positive"),
    (["--node", "a=-2G"], "memory must be positive"),
    (["--node", "a=12G", "--ctx", "0"], "at least 1 token"),
    (["--node", "a=12G", "--node", "b=12G", "--layers", "zz=0:10"], "not among the nodes"),
    (["--node", "a=12G", "--node", "b=12G", "--layers", "a=10:20"], "follow the node order"),
    (["--node", "a=12G", "--layers", "a=0:99"], "out of bounds"),
    (["--node", "a"], "is not of the form NAME=MEM"),
    (["--node", "a=12XB"], "is not a size"),
    (["--node", "a=12G,fast"], "unknown option 'fast'"),
    (["--node", "a=12G,bw=x"], "not a number of GB/s"),
    (["--node", "a=12G", "--node", "a=8G"], "unique"),
    (["--worker", "127.0.0.1:9"], "127.0.0.1:9 is not reachable"),
])
def test_bad_input_is_one_line(capsys: pytest.CaptureFixture[str], qwq: Path,
                               args: list[str], message: str) -> None:
    if "--ctx" not in args:
        args = [*args, "--ctx", "16384"]
    code, _, err = run(capsys, "--model", str(qwq), *args)
    assert code == 2 and err.count("\n") == 1 and message in err
    assert err.startswith("specshard: error:") and "Traceback" not in err


def test_demo_target_fits_local_cpu_workers(demo_target: Path, demo_draft: Path) -> None:
    for count in (2, 3):
        result = plan(demo_target, nodes(*[3] * count), 4096, draft=demo_draft)
        assert result.feasible and within_capacity(result) and tiles(result)


# llama.cpp's own sizes: load each model once in a subprocess, create contexts, parse the log.
_PROBE = r"""
import ctypes, json, re, sys
import llama_cpp
lines = []
@llama_cpp.llama_log_callback
def on_log(level, text, user):
    lines.append(text.decode(errors="replace"))
llama_cpp.llama_log_set(on_log, ctypes.c_void_p(0))
llama_cpp.llama_backend_init()
model = llama_cpp.llama_model_load_from_file(sys.argv[1].encode(),
                                             llama_cpp.llama_model_default_params())
sizes = []
for n_ctx, kv_type, flash in json.loads(sys.argv[2]):
    del lines[:]
    p = llama_cpp.llama_context_default_params()
    p.n_ctx, p.n_batch, p.n_ubatch, p.type_k, p.type_v = n_ctx, 512, 512, kv_type, kv_type
    p.flash_attn_type = (llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash
                         else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED)
    ctx = llama_cpp.llama_init_from_model(model, p)
    log = "".join(lines)
    mib = lambda what: float(re.search(what + r" buffer size = +([\d.]+) MiB", log).group(1))
    sizes.append([mib("KV"), mib("compute")])
    llama_cpp.llama_free(ctx)
print(json.dumps(sizes))
"""
_CONFIGS = [(4096, KvType.F16, False), (4096, KvType.F16, True), (4096, KvType.Q8_0, True),
            (16384, KvType.F16, False), (1000, KvType.F16, False)]


def llama_cpp_sizes(model: Path) -> list[tuple[float, float]]:
    configs = [(n, kv.ggml_type, fa) for n, kv, fa in _CONFIGS]
    out = subprocess.run([sys.executable, "-c", _PROBE, str(model), json.dumps(configs)],
                         capture_output=True, text=True, check=True, timeout=300).stdout
    return [tuple(x) for x in json.loads(out)]


@pytest.mark.slow
@pytest.mark.parametrize("which", ["demo", "qwq-middle-stage", "qwq-last-stage"])
def test_memory_model_agrees_with_llama_cpp(which: str, demo_target: Path,
                                            tmp_path: Path) -> None:
    if which == "demo":
        model = demo_target
    else:  # a 2-layer QwQ-shaped stage file: the buffers do not depend on the layer count
        spec = dataclasses.replace(QWQ_32B_Q4_K_H, layer_types=("Q4_K_M",) * 2,
                                   token_embd_type=GGMLQuantizationType.Q6_K, output_type=None)
        if which == "qwq-middle-stage":
            spec = dataclasses.replace(spec, n_vocab=8,
                                       token_embd_type=GGMLQuantizationType.F32)
        model = write_shape_only(tmp_path / "stage.gguf", spec)
    shape = model_shape(model)
    for (n_ctx, kv, flash), (kv_mib, compute_mib) in zip(
            _CONFIGS, llama_cpp_sizes(model), strict=True):
        ours_kv = kv_bytes(shape.info, shape.info.n_layer, kv, n_ctx, 1) / MIB
        ours_compute = compute_bytes(shape, True, n_ctx, 1, flash) / MIB
        assert ours_kv == pytest.approx(kv_mib, rel=0.05), (n_ctx, kv, flash)
        assert ours_compute == pytest.approx(compute_mib, rel=0.05), (n_ctx, kv, flash)
