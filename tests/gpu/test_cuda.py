"""Real-GPU loads: the torch.load documentation's CUDA examples through ckptd.load.

Marked ``gpu``: they run where CUDA is available and are skipped elsewhere.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import ckptd

pytestmark = pytest.mark.gpu


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    path = tmp_path / "model.pt"
    torch.save({"w": torch.randn(64, 32, dtype=torch.bfloat16), "b": torch.arange(7), "e": torch.empty(0)}, path)
    return path


def _assert_equal_on(result: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], device: torch.device) -> None:
    assert list(result) == list(expected)
    for name, tensor in expected.items():
        assert result[name].device == tensor.device == device
        assert result[name].dtype == tensor.dtype and result[name].shape == tensor.shape
        assert torch.equal(result[name].cpu(), tensor.cpu())


@pytest.mark.parametrize(
    "map_location",
    ["cuda:0", torch.device("cuda", 0), {"cpu": "cuda:0"}, lambda storage, loc: storage.cuda(0)],
    ids=["str", "device", "dict", "callable"],
)
def test_load_onto_gpu_matches_torch(checkpoint: Path, map_location: object) -> None:
    expected = torch.load(checkpoint, map_location=map_location)
    _assert_equal_on(ckptd.load(checkpoint, map_location=map_location), expected, torch.device("cuda", 0))


def test_gpu_tensors_of_one_load_share_one_arena(checkpoint: Path) -> None:
    result = ckptd.load(checkpoint, map_location="cuda:0")
    w, b = result["w"].untyped_storage(), result["b"].untyped_storage()
    assert abs(w.data_ptr() - b.data_ptr()) < 64 * 32 * 2 + 7 * 8 + 128


def test_cuda_saved_file_loads_back_to_its_device(tmp_path: Path) -> None:
    path = tmp_path / "cuda.pt"
    torch.save({"w": torch.randn(5, device="cuda:0")}, path)
    _assert_equal_on(ckptd.load(path), torch.load(path), torch.device("cuda", 0))
    _assert_equal_on(ckptd.load(path, map_location={"cuda:0": "cpu"}), torch.load(path, map_location={"cuda:0": "cpu"}), torch.device("cpu"))


def test_embedded_load_waits_for_work_pending_on_the_current_stream(tmp_path: Path) -> None:
    """Issue 13, item 3: the arena reuses a block whose last user's kernels are still queued on
    the current stream; the fill's side streams must run after them, not race them."""
    n = 4 << 20  # 16 MiB of float32: the arena is the same size as the scratch block it reuses
    path = tmp_path / "fresh.pt"
    expected = torch.randn(n)
    torch.save({"w": expected}, path)
    for _ in range(3):
        scratch = torch.empty(n, device="cuda:0")
        torch.cuda._sleep(200_000_000)  # keep the current stream busy (~0.1 s) ...
        scratch.fill_(7.0)  # ... so this write is still pending when the block is freed
        del scratch
        result = ckptd.load(path, map_location="cuda:0")
        torch.cuda.synchronize()
        assert torch.equal(result["w"].cpu(), expected)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_bare_cuda_follows_each_threads_current_device(checkpoint: Path) -> None:
    """Issue 13, item 5: ``"cuda"`` is the calling thread's current device, on every call."""
    import threading

    seen: dict[int, torch.device] = {}

    def load_on(index: int) -> None:
        torch.cuda.set_device(index)
        seen[index] = ckptd.load(checkpoint, map_location="cuda")["w"].device

    for index in (1, 0):
        thread = threading.Thread(target=load_on, args=(index,))
        thread.start()
        thread.join()
    assert seen == {0: torch.device("cuda", 0), 1: torch.device("cuda", 1)}
