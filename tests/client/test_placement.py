"""map_location resolution: a bare ``"cuda"`` is the calling thread's current device, every time."""

from __future__ import annotations

import pytest
import torch

from ckptd.engine import _placement


def test_bare_cuda_is_resolved_on_every_call(monkeypatch: pytest.MonkeyPatch) -> None:
    # torch resolves "cuda" through the current device, which changes (torch.cuda.set_device,
    # another thread): stand-in devices for two current devices, as no GPU is here
    answers = iter([torch.device("cpu"), torch.device("meta")])

    def restore(storage: torch.UntypedStorage, tag: str) -> torch.UntypedStorage:
        assert tag == "cuda"
        return torch.UntypedStorage(0, device=next(answers))

    monkeypatch.setattr(_placement, "restore", restore)
    assert _placement.device_for_tag("cuda") == torch.device("cpu")
    assert _placement.device_for_tag("cuda") == torch.device("meta")  # not the first answer, cached


def test_indexed_tags_keep_their_index() -> None:
    assert _placement.with_current_device("cuda:1", lambda: 0) == "cuda:1"
    assert _placement.with_current_device(torch.device("cuda"), lambda: 2) == "cuda:2"
    assert _placement.with_current_device(b"cuda", lambda: 2) == "cuda:2"
    assert _placement.with_current_device({"cuda:0": "cuda", "cpu": "cpu"}, lambda: 5) == {"cuda:0": "cuda:5", "cpu": "cpu"}
    calls = []
    _placement.with_current_device({"a": "cuda", "b": "cuda"}, lambda: calls.append(1) or 0)
    assert calls == [1]  # asked once per load
