from __future__ import annotations

import os

# Before anything imports the engine: sequence state is written by the engine's step
# thread only, checked in every test (and in the servers the tests start).
os.environ["SPECSHARD_OWNER_CHECK"] = "1"
os.environ.setdefault("GOMP_SPINCOUNT", "10000")

from collections.abc import Iterator  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from cluster import models  # noqa: E402
from cluster.stage_cut import StageSpec, split_at  # noqa: E402
from coordinator.placement.local import LocalWorkers  # noqa: E402
from coordinator.ring.builder import BuiltRing, build_ring  # noqa: E402
from coordinator.speculation.draft import DraftConfig, DraftModel  # noqa: E402
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


def _demo_sizes(request: pytest.FixtureRequest) -> tuple[int, int]:
    """(context, slots) for `ring` and `drafter`: the requesting module's N_CTX (1024 if
    it has none) and RING_SLOTS (1 if it has none)."""
    return (int(getattr(request.module, "N_CTX", 1024)),
            int(getattr(request.module, "RING_SLOTS", 1)))


@contextmanager
def local_ring(model: Path, split: list[StageSpec], ctx: int, parallel: int = 1
               ) -> Iterator[BuiltRing]:
    """`model` on one local gRPC worker per stage of `split`, one thread each."""
    workers = LocalWorkers(len(split)).start()
    try:
        built = build_ring(model, workers=workers, ctx=ctx, parallel=parallel, threads=1,
                           split=split)
    except BaseException:
        workers.stop()
        raise
    try:
        yield built
    finally:
        built.close()


@pytest.fixture(scope="module")
def ring(request: pytest.FixtureRequest, demo_target: Path) -> Iterator[BuiltRing]:
    """The demo target on two local gRPC workers, 14 layers each; one per test module,
    sized by the module (`_demo_sizes`)."""
    ctx, slots = _demo_sizes(request)
    with local_ring(demo_target, split_at(28, [14]), ctx, slots) as built:
        yield built


@pytest.fixture(scope="module")
def drafter(request: pytest.FixtureRequest, demo_draft: Path) -> Iterator[DraftModel]:
    """The demo draft model in this process, sized like `ring`."""
    ctx, slots = _demo_sizes(request)
    # One thread: on two cores shared with two workers, two draft threads ran 3× slower.
    d = DraftModel(DraftConfig(demo_draft, n_ctx=ctx, n_seq_max=slots, n_threads=1))
    yield d
    d.close()
