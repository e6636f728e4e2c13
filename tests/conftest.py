from __future__ import annotations

import os

# Before anything imports the engine: sequence state is written by the engine's step
# thread only, checked in every test (and in the servers the tests start).
os.environ["SPECSHARD_OWNER_CHECK"] = "1"
os.environ.setdefault("GOMP_SPINCOUNT", "10000")

from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from cluster import models  # noqa: E402
from tests.tiny_gguf import write_tiny_model  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def specshard_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Stage caches go to a per-run folder; the demo models stay in the user's cache."""
    real_home = Path(os.environ.get("SPECSHARD_HOME", Path.home() / ".cache" / "specshard"))
    home = tmp_path_factory.mktemp("specshard_home")
    (home / "models").symlink_to(real_home / "models", target_is_directory=True)
    os.environ["SPECSHARD_HOME"] = str(home)
    yield home


@pytest.fixture(scope="session")
def demo_target(specshard_home: Path) -> Path:
    path = models.demo_path(models.DEMO_TARGET)
    if not path.exists():
        pytest.fail("demo target missing: run `specshard models fetch` (make test does)")
    return path


@pytest.fixture(scope="session")
def demo_draft(specshard_home: Path) -> Path:
    path = models.demo_path(models.DEMO_DRAFT)
    if not path.exists():
        pytest.fail("demo draft missing: run `specshard models fetch` (make test does)")
    return path


@pytest.fixture()
def tiny_model(tmp_path: Path) -> Path:
    return write_tiny_model(tmp_path / "tiny.gguf")


@pytest.fixture()
def tiny_tied_model(tmp_path: Path) -> Path:
    return write_tiny_model(tmp_path / "tiny-tied.gguf", tied=True)


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory: pytest.TempPathFactory, demo_target: Path) -> Path:
    """Random weights, 4 layers of 64, the demo target's tokenizer and chat template:
    for end-to-end tests where the demo model's answers add nothing."""
    return write_tiny_model(tmp_path_factory.mktemp("tiny-chat") / "tiny-chat.gguf",
                            vocab_from=demo_target, n_ctx=4096)
