"""`specshard generate` end to end on the demo target, as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def specshard(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cluster.cli", *args], capture_output=True,
                          text=True, timeout=300)


def test_generate_json_two_stages(demo_target):
    result = specshard("generate", "--model", str(demo_target), "--stages", "2",
                       "--max-tokens", "12", "--prompt", "Write hello world in C.", "--json",
                       "--threads", "2")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert 1 <= len(out["tokens"]) <= 12
    assert out["finish_reason"] in ("stop", "length")
    assert out["text"].strip()
    stats = out["stats"]
    assert stats["n_tokens"] == len(out["tokens"])
    assert stats["n_prompt_tokens"] > 5
    assert stats["tok_s"] > 0 and stats["prompt_tok_s"] > 0


def test_generate_prompt_over_context_is_refused(demo_target):
    result = specshard("generate", "--model", str(demo_target), "--ctx", "32", "--raw",
                       "--prompt", "word " * 200, "--max-tokens", "4")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        line for line in result.stderr.strip().splitlines() if "context" in line]


def test_generate_over_local_grpc_workers_equals_in_process(demo_target):
    common = ("--model", str(demo_target), "--max-tokens", "12", "--json", "--threads", "1",
              "--prompt", "Write a C function that reverses a string.")
    ring = specshard("generate", "--workers", "2", "--pin", *common)
    single = specshard("generate", *common)
    assert ring.returncode == 0, ring.stderr
    assert single.returncode == 0, single.stderr
    assert json.loads(ring.stdout)["tokens"] == json.loads(single.stdout)["tokens"]


def test_generate_with_unreachable_worker_is_a_clear_error(demo_target, tmp_path):
    token = tmp_path / "token"
    token.write_text("x" * 32)
    token.chmod(0o600)
    result = specshard("generate", "--model", str(demo_target), "--prompt", "hi",
                       "--worker", "127.0.0.1:9", "--token-file", str(token))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "specshard: error: worker 127.0.0.1:9 is not reachable"]
