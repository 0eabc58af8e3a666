"""``ckptd.load_into`` and ``ckptd.meta_parameters``: models whose tensors are the loaded ones.

Proved with addresses, not trust: every parameter's data lies inside ckptd's arena mapping
(/proc/self/maps), worker processes served by the daemon keep no private copy of those
pages (/proc/self/smaps), and outputs equal the reference model's.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch import nn

import ckptd
from ckptd_testlib import Daemon, daemon_in, report_of

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"ckptd_example_{name}", EXAMPLES / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


worker = _example("worker")


def _mapping_of(address: int) -> str:
    """The pathname of the mapping holding ``address`` in this process (/proc/self/maps)."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        start, end = (int(x, 16) for x in fields[0].split("-"))
        if start <= address < end:
            return fields[5] if len(fields) > 5 else "[anonymous]"
    raise AssertionError(f"{address:#x} is in no mapping")


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Path, nn.Module]:
    torch.manual_seed(0)
    reference = worker.TinyLM().eval()
    path = tmp_path / "tinylm.pt"
    torch.save(reference.state_dict(), path)
    return path, reference


def _empty_model() -> nn.Module:
    with ckptd.meta_parameters():
        return worker.TinyLM()


def _same_outputs(model: nn.Module, reference: nn.Module) -> None:
    tokens = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    with torch.no_grad():
        assert torch.equal(model.eval()(tokens), reference(tokens))


def test_meta_parameters_keeps_buffers_real() -> None:
    model = _empty_model()
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert model.positions.device.type == "cpu" and torch.equal(model.positions, torch.arange(128))
    assert model.head.weight is model.embed.weight
    with pytest.raises(ZeroDivisionError), ckptd.meta_parameters():
        raise ZeroDivisionError
    assert nn.Linear(2, 2).weight.device.type == "cpu"  # the patch is gone after the block


_FIRST_BUILD = textwrap.dedent(
    """
    import sys, time
    import torch
    from torch import nn
    import ckptd
    started = time.process_time()
    with ckptd.meta_parameters():
        model = nn.Sequential(
            nn.Embedding(64, 32), nn.TransformerEncoderLayer(32, 4, 64, batch_first=True),
            nn.Conv1d(32, 32, 3), nn.LayerNorm(32), nn.Linear(32, 8),
        )
    assert {p.device.type for p in model.parameters()} == {"meta"}
    print("torch._dynamo" in sys.modules, time.process_time() - started)
    """
)


def test_meta_parameters_fills_no_meta_values() -> None:
    """torch runs Python meta kernels for nn.init's random fills, and the first imports
    torch._dynamo (~1.3 s of CPU in a fresh worker); a meta tensor has no values to fill."""
    run = subprocess.run([sys.executable, "-c", _FIRST_BUILD], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    dynamo, cpu = run.stdout.split()
    assert dynamo == "False", cpu


def test_meta_parameters_still_fills_real_tensors() -> None:
    real, torchs = torch.zeros(4, 4), nn.init.normal_
    with ckptd.meta_parameters():
        nn.init.ones_(real)  # a tensor of the caller's own, not a parameter being registered
        model = nn.Linear(4, 4)
    assert torch.equal(real, torch.ones(4, 4)) and model.weight.is_meta
    assert nn.init.normal_ is torchs  # torch's initializers are back after the block
    assert nn.Linear(4, 4).weight.abs().sum() > 0


def test_parameters_are_the_arena(saved: tuple[Path, nn.Module]) -> None:
    path, reference = saved
    model = _empty_model()
    result = ckptd.load_into(model, path)
    assert result.missing_keys == [] and result.unexpected_keys == []
    _same_outputs(model, reference)
    assert model.head.weight is model.embed.weight  # the tie survived assign=True
    state = dict(reference.state_dict())
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, state[name]), name
        assert "ckptd-arena" in _mapping_of(tensor.data_ptr()), name  # not torch-allocated memory
    assert model.embed.weight.requires_grad and isinstance(model.embed.weight, nn.Parameter)


def test_checkpoint_without_the_tied_twin(saved: tuple[Path, nn.Module], tmp_path: Path) -> None:
    path, reference = saved
    state = torch.load(path)
    del state["head.weight"]  # what save_pretrained writes for tied embeddings
    torch.save(state, tmp_path / "untied.pt")
    model = _empty_model()
    assert ckptd.load_into(model, tmp_path / "untied.pt").missing_keys == []
    assert model.head.weight is model.embed.weight
    _same_outputs(model, reference)


def test_key_picks_the_state_dict(saved: tuple[Path, nn.Module], tmp_path: Path) -> None:
    path, reference = saved
    torch.save({"model": torch.load(path), "step": 3}, tmp_path / "train.pt")
    model = _empty_model()
    ckptd.load_into(model, tmp_path / "train.pt", key="model")
    _same_outputs(model, reference)
    with pytest.raises(ckptd.UsageError, match="key='model'"):
        ckptd.load_into(_empty_model(), tmp_path / "train.pt")
    with pytest.raises(ckptd.UsageError, match="no entry 'weights'.*'model', 'step'"):
        ckptd.load_into(_empty_model(), tmp_path / "train.pt", key="weights")


def test_mismatches_are_model_mismatch_errors(saved: tuple[Path, nn.Module], tmp_path: Path) -> None:
    path, _ = saved
    state = torch.load(path)
    torch.save({**state, "extra.weight": torch.zeros(1)}, tmp_path / "extra.pt")
    with pytest.raises(ckptd.ModelMismatchError, match="unexpected keys \\['extra.weight'\\]"):
        ckptd.load_into(_empty_model(), tmp_path / "extra.pt")
    assert ckptd.load_into(_empty_model(), tmp_path / "extra.pt", strict=False).unexpected_keys == ["extra.weight"]

    torch.save({**state, "norm.weight": torch.ones(3)}, tmp_path / "shape.pt")
    with pytest.raises(ckptd.ModelMismatchError, match="size mismatch for norm.weight") as info:
        ckptd.load_into(_empty_model(), tmp_path / "shape.pt", strict=False)
    assert isinstance(info.value, RuntimeError)  # what torch's load_state_dict raises

    torch.save({k: v for k, v in state.items() if k != "norm.bias"}, tmp_path / "missing.pt")
    with pytest.raises(ckptd.ModelMismatchError, match="missing keys \\['norm.bias'\\]"):
        ckptd.load_into(_empty_model(), tmp_path / "missing.pt")
    with pytest.raises(ckptd.ModelMismatchError, match="still on the meta device.*norm.bias"):
        ckptd.load_into(_empty_model(), tmp_path / "missing.pt", strict=False)


def test_model_built_on_meta_loses_its_buffers(saved: tuple[Path, nn.Module]) -> None:
    path, _ = saved
    with torch.device("meta"):
        model = worker.TinyLM()
    with pytest.raises(ckptd.ModelMismatchError, match="positions.*meta_parameters"):
        ckptd.load_into(model, path)


def test_not_a_state_dict(tmp_path: Path) -> None:
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    with pytest.raises(ckptd.UsageError, match="does not hold a state dict of tensors"):
        ckptd.load_into(_empty_model(), tmp_path / "list.pt")


class _CopyingLinear(nn.Linear):
    """A module whose loading copies into its own memory: what load_into must catch."""

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[no-untyped-def]
        with torch.no_grad():
            self.weight.copy_(state_dict.pop(prefix + "weight"))
            self.bias.copy_(state_dict.pop(prefix + "bias"))


def test_a_copy_is_caught(tmp_path: Path) -> None:
    torch.save(nn.Linear(3, 2).state_dict(), tmp_path / "lin.pt")
    with pytest.raises(ckptd.ModelMismatchError, match="copied, not shared.*weight"):
        ckptd.load_into(_CopyingLinear(3, 2), tmp_path / "lin.pt")


# --- through the daemon: worker processes --------------------------------------------------

WORKER = textwrap.dedent(
    """
    import importlib.util, json, os, sys
    import torch
    import ckptd
    examples, url, path, shm, out = sys.argv[1:6]
    spec = importlib.util.spec_from_file_location("worker", os.path.join(examples, "worker.py"))
    worker = importlib.util.module_from_spec(spec); spec.loader.exec_module(worker)
    model, _ = worker.build(path, url=url)

    def smaps(address):
        found, fields = False, {}
        for line in open("/proc/self/smaps"):
            head = line.split()
            if "-" in head[0] and not head[0].endswith(":"):
                start, end = (int(x, 16) for x in head[0].split("-"))
                found = start <= address < end
                fields = {"path": head[5] if len(head) > 5 else ""} if found else fields
            elif found and head[0].endswith(":") and head[-1] == "kB":
                fields[head[0][:-1]] = int(head[1]) * 1024
        return fields

    with torch.no_grad():
        checksum = sum(float(t.double().sum()) for t in model.state_dict().values())  # touches every page
        logits = model(torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]]))
    tensors = list(model.state_dict().values())
    maps = {smaps(t.data_ptr())["path"] for t in tensors}
    report = {"maps": sorted(maps), "checksum": checksum, "logits": float(logits.double().sum()),
              "nbytes": sum(t.untyped_storage().nbytes() for t in {t.untyped_storage().data_ptr(): t for t in tensors}.values()),
              "smaps": smaps(model.embed.weight.data_ptr())}
    with open(out + ".tmp", "w") as f:
        json.dump(report, f)
    os.replace(out + ".tmp", out)
    sys.stdin.readline()
    """
)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    yield from daemon_in(tmp_path_factory.mktemp("daemon"))


def _worker(tmp: Path, daemon: Daemon, path: Path, name: str) -> tuple[subprocess.Popen, Path]:
    script = tmp / "worker_script.py"
    script.write_text(WORKER)
    out = tmp / f"{name}.json"
    argv = [sys.executable, str(script), str(EXAMPLES), daemon.url, str(path), str(daemon.shm), str(out)]
    return subprocess.Popen(argv, stdin=subprocess.PIPE, text=True), out


def test_two_workers_share_one_copy(daemon: Daemon, tmp_path: Path) -> None:
    torch.manual_seed(0)
    reference = worker.TinyLM().eval()
    path = daemon.root / "tinylm.pt"
    torch.save(reference.state_dict(), path)
    with torch.no_grad():
        expected_logits = float(reference(torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])).double().sum())
    expected_sum = sum(float(t.double().sum()) for t in reference.state_dict().values())

    procs = []
    try:
        reports = []
        for name in ("w1", "w2"):  # sequentially: w2 measures while w1 still maps every page
            proc, out = _worker(tmp_path, daemon, path, name)
            procs.append(proc)
            reports.append(report_of(proc, out))
        for report in reports:
            assert report["logits"] == expected_logits and report["checksum"] == expected_sum
            (mapped,) = report["maps"]  # every tensor inside one mapping: the daemon's arena
            assert mapped.startswith("/memfd:ckptd-"), mapped
            assert report["smaps"]["Anonymous"] == 0  # no page copied on write (copies would be anonymous)
        (arena,) = daemon.arenas()
        assert reports[0]["maps"] == [str(arena)] and reports[1]["maps"] == [str(arena)]
        # Pages both workers map count as shared in the second one's view: one copy for two.
        # (shared-memory pages are always "dirty": they have no file on disk to be clean against)
        shared = reports[1]["smaps"]["Shared_Clean"] + reports[1]["smaps"]["Shared_Dirty"]
        assert shared >= 0.95 * reports[1]["nbytes"], reports[1]["smaps"]
    finally:
        for proc in procs:
            proc.communicate("\n", timeout=30)


def test_example_worker_runs_through_the_daemon(daemon: Daemon) -> None:
    path = daemon.root / "example.pt"
    subprocess.run([sys.executable, str(EXAMPLES / "worker.py"), "save", str(path)], check=True, capture_output=True)
    env = {**os.environ, "CKPTD_URL": daemon.url}
    run = subprocess.run([sys.executable, str(EXAMPLES / "worker.py"), "run", str(path)], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert f"({daemon.url}); generated [1, 2, 3, 4," in run.stdout
    embedded = subprocess.run([sys.executable, str(EXAMPLES / "worker.py"), "run", str(path)], capture_output=True, text=True,
                              env={k: v for k, v in os.environ.items() if k != "CKPTD_URL"})
    assert embedded.stdout.split("generated")[1] == run.stdout.split("generated")[1]


def test_hf_example(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    hf = _example("hf_worker")
    directory = tmp_path / "tiny-llama"
    torch.manual_seed(0)
    hf.LlamaForCausalLM(hf.CONFIG).save_pretrained(directory)
    model, _ = hf.build(str(directory))
    reference = hf.LlamaForCausalLM.from_pretrained(directory).eval()
    tokens = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, reference(tokens).logits)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert all("ckptd-arena" in _mapping_of(p.data_ptr()) for p in model.parameters())
