"""Which GPUs a process reports: CUDA_VISIBLE_DEVICES read the way CUDA reads it, since
NVML (which lists them) ignores it; and `specshard worker --gpu` naming a real one."""

from __future__ import annotations

import pytest

from cluster.errors import SpecshardError
from cluster.hardware import GpuInfo, gpus, host_info, visible_indices
from worker.commands import check_gpu

UUIDS = ["GPU-8932f937-d72c-4106-c12f-20bd9faed9f6", "GPU-1a2b3c4d-0000-1111-2222-333344445555",
         "GPU-1a2b9999-0000-1111-2222-333344445555"]


@pytest.mark.parametrize(("spec", "want"), [
    (None, [0, 1, 2]),             # unset: every GPU
    ("1", [1]),                    # one worker per GPU
    ("2,0", [2, 0]),               # CUDA's order is the list's
    (" 1 , 2 ", [1, 2]),
    ("0,2,-1,1", [0, 2]),          # CUDA stops at the first invalid entry
    ("0,7,1", [0]),                # an index past the end is invalid
    ("", []),                      # set but empty: no GPU at all
    ("-1", []),
    (UUIDS[2], [2]),               # by UUID
    ("GPU-8932f9,1", [0, 1]),      # a unique prefix is enough
    ("GPU-1a2b,0", []),            # an ambiguous prefix names no GPU
    ("MIG-5c3e1f0a-aaaa-bbbb-cccc-ddddeeeeffff", []),
    ("1,1", [1]),
])
def test_visible_indices_read_cuda_visible_devices(spec: str | None, want: list[int]) -> None:
    assert visible_indices(spec, UUIDS) == want


def _gpu(index: int) -> GpuInfo:
    return GpuInfo(index=index, name="NVIDIA GeForce RTX 4070", total_bytes=12 << 30,
                   free_bytes=11 << 30, utilization_percent=0, temperature_c=40,
                   driver="550.54")


def test_check_gpu_names_the_gpus_there_are() -> None:
    assert check_gpu(1, [_gpu(0), _gpu(1)], "").index == 1
    with pytest.raises(SpecshardError, match=r"^--gpu 2: no such GPU; this machine has "
                                             r"0 \(NVIDIA GeForce RTX 4070\), 1 \("):
        check_gpu(2, [_gpu(0), _gpu(1)], "")


def test_this_machine_s_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """With NVML (a GPU box): `--gpu` accepts its last GPU, and a process limited to it
    reports that one only. Without (CI): `--gpu` says why, and the process reports none."""
    found, error = gpus(None)
    if found:
        assert check_gpu(found[-1].index, found, error) == found[-1]
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", str(found[-1].index))
        assert [g.index for g in host_info().gpus] == [found[-1].index]
        return
    with pytest.raises(SpecshardError, match=r"^--gpu 0: no NVIDIA GPU on this machine \("):
        check_gpu(0, found, error)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    info = host_info()
    assert info.gpus == [] and info.gpu_error == error
