"""ckptd.load returns what torch.load returns, object for object.

Every case loads the same file with torch.load and ckptd.load, with the same arguments and
the same input form, and compares the results with ``assert_same`` (or, where torch raises,
checks ckptd raises the same exception class or a subclass, with torch's message), and the
warnings each emitted.

Matrix: the CORE objects get every save variant x input form x weights_only x map_location;
the rest of the corpus gets every save variant with a rotating input form, plus a recording
map_location on the zip and legacy variants.
"""

from __future__ import annotations

import io
import pickle
import warnings

import pytest
import torch

from ckptd_testlib import (
    CORE,
    CORPUS,
    FORMS,
    LocationRecorder,
    NonSeekable,
    TaggedTensor,
    assert_conform,
    assert_same,
    load_both,
    save_bytes,
    saved_as,
)

pytestmark = pytest.mark.usefixtures("ckptd_mod")

MAP_LOCATIONS = {
    "none": lambda: None,
    "str_cpu": lambda: "cpu",
    "device_cpu": lambda: torch.device("cpu"),
    "dict_cpu": lambda: {"cpu": "cpu"},
    "lambda_identity": lambda: (lambda s, loc: s),
    "lambda_none": lambda: (lambda s, loc: None),
    "recorder": LocationRecorder,
}


def _check_recorders(variant: str, trec, crec) -> None:
    if not isinstance(trec, LocationRecorder):
        return
    assert trec.calls, "torch.load never called the map_location callable"
    if variant == "legacy":
        # torch's legacy reader calls map_location before it reads the bytes: compare the rest.
        t = [c[:3] for c in trec.calls]
        c = [c[:3] for c in crec.calls]
    else:
        t, c = trec.calls, crec.calls
    assert len(c) == len(t), f"map_location called {len(c)} times by ckptd, {len(t)} by torch"
    for i, (x, y) in enumerate(zip(t, c)):
        assert y == x, f"call {i}: ckptd passed {y[:3]} (+{len(y[3])} bytes), torch passed {x[:3]} (+{len(x[3])} bytes)"


# ---------------------------------------------------------------------------------------
# The matrix
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("map_location", list(MAP_LOCATIONS))
@pytest.mark.parametrize("weights_only", [True, False, None])
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("variant", ["zip", "legacy", "zip_nocrc", "zip_big"])
@pytest.mark.parametrize("name", CORE)
def test_core_matrix(saved, name, variant, form, weights_only, map_location):
    path = saved(name, variant)
    t, c, trec, crec = load_both(
        path, form, weights_only=weights_only, map_location_factory=MAP_LOCATIONS[map_location]
    )
    assert t.exc is None, f"torch.load failed on a corpus object: {t.exc!r}"
    assert_conform(t, c)
    _check_recorders(variant, trec, crec)


_SLICE = [
    pytest.param(name, variant, FORMS[(i + j) % len(FORMS)], id=f"{name}-{variant}-{FORMS[(i + j) % len(FORMS)]}")
    for i, name in enumerate(CORPUS)
    if name not in CORE
    for j, variant in enumerate(CORPUS[name].variants)
]


@pytest.mark.parametrize(("name", "variant", "form"), _SLICE)
def test_corpus(saved, name, variant, form):
    entry = CORPUS[name]
    t, c = load_both(saved(name, variant), form, weights_only=entry.weights_only_ok)
    assert t.exc is None, f"torch.load failed on a corpus object: {t.exc!r}"
    assert_conform(t, c)


@pytest.mark.parametrize("variant", ["zip", "legacy", "zip_big"])
@pytest.mark.parametrize("name", [n for n in CORPUS if n not in CORE])
def test_corpus_map_location_recorder(saved, name, variant):
    entry = CORPUS[name]
    if variant not in entry.variants:
        pytest.skip(f"{name} has no {variant} variant")
    t, c, trec, crec = load_both(
        saved(name, variant), "str", weights_only=entry.weights_only_ok, map_location_factory=LocationRecorder
    )
    assert_conform(t, c)
    _check_recorders(variant, trec, crec)


@pytest.mark.parametrize("name", [n for n in CORPUS if CORPUS[n].weights_only_ok])
def test_corpus_weights_only_default(saved, name):
    """weights_only=None (torch's default, True since 2.6) over every weights-only-safe object."""
    t, c = load_both(saved(name, "zip"), "bytes")
    assert_conform(t, c)


@pytest.mark.parametrize("name", [n for n in CORPUS if not CORPUS[n].weights_only_ok])
@pytest.mark.parametrize("weights_only", [True, None])
def test_unsafe_objects_rejected_by_weights_only(saved, ckptd_mod, name, weights_only):
    """Objects needing arbitrary globals fail in both; ckptd's error is an UnpicklingError."""
    for variant in ("zip", "legacy"):
        t, c = load_both(saved(name, variant), "str", weights_only=weights_only)
        assert isinstance(t.exc, pickle.UnpicklingError), t.exc
        assert isinstance(c.exc, ckptd_mod.UnpicklingError), repr(c.exc)
        assert isinstance(c.exc, pickle.UnpicklingError)
        assert c.warnings == t.warnings


def test_custom_class_message_names_the_global(saved, ckptd_mod):
    t, c = load_both(saved("custom_object", "zip"), "str", weights_only=True)
    assert "ckptd_testlib.checkpoints.CustomThing" in str(t.exc)
    assert isinstance(c.exc, ckptd_mod.UnpicklingError)
    assert "CustomThing" in str(c.exc), str(c.exc)


def test_subclass_attributes_survive(saved, ckptd_mod):
    got = ckptd_mod.load(saved("tensor_subclass", "zip"), weights_only=False)
    assert type(got["tagged"]) is TaggedTensor
    assert got["tagged"].tag == "hello" and got["tagged"].meta == {"k": 1, "v": [1, 2]}


def test_state_dict_metadata_survives(saved, ckptd_mod):
    got = ckptd_mod.load(saved("module_state_dict", "zip"))
    assert got._metadata == CORPUS["module_state_dict"].build()._metadata


def test_result_tensors_are_not_torch_storages(saved, ckptd_mod):
    """The point of ckptd: results alias its arena (so data_ptrs differ) yet compare equal."""
    path = saved("big_tensor", "zip")
    t = torch.load(path)
    c = ckptd_mod.load(path)
    assert_same(t, c)
    assert c["big"].untyped_storage().data_ptr() != t["big"].untyped_storage().data_ptr()


# ---------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["ascii", "latin1", "bytes", "utf-8"])
@pytest.mark.parametrize("variant", ["zip", "legacy"])
@pytest.mark.parametrize("weights_only", [False, True])
def test_encoding_pickle_arg(saved, variant, encoding, weights_only):
    # weights_only=True with pickle_load_args makes torch warn; ckptd must warn the same.
    t, c = load_both(saved("nested_containers", variant), "str", weights_only=weights_only, encoding=encoding)
    assert_conform(t, c)
    if weights_only:
        assert t.warnings, "expected torch to warn about pickle_load_args under weights_only"


@pytest.mark.parametrize("form", ["str", "pathlib"])
@pytest.mark.parametrize("variant", ["zip", "zip_nocrc", "zip_big"])
@pytest.mark.parametrize("name", ["views_and_ties", "all_dtypes", "quantized", "transformer"])
def test_mmap_path(saved, name, variant, form):
    t, c = load_both(saved(name, variant), form, mmap=True)
    assert_conform(t, c)


@pytest.mark.parametrize("form", ["bytesio", "file", "bytes"])
def test_mmap_needs_a_path(saved, form):
    t, c = load_both(saved("plain_dict", "zip"), form, mmap=True)
    assert isinstance(t.exc, ValueError), t.exc
    assert_conform(t, c)


@pytest.mark.parametrize("form", ["str", "pathlib"])
def test_mmap_legacy_file(saved, form):
    t, c = load_both(saved("plain_dict", "legacy"), form, mmap=True)
    assert isinstance(t.exc, RuntimeError), t.exc
    assert_conform(t, c)


def test_explicit_pickle_module_with_weights_only(saved):
    t, c = load_both(saved("plain_dict", "zip"), "str", weights_only=True, pickle_module=pickle)
    assert isinstance(t.exc, RuntimeError) and "explicit pickle_module" in str(t.exc)
    assert_conform(t, c)


@pytest.mark.parametrize("variant", ["zip", "legacy"])
def test_explicit_pickle_module_default_weights_only(saved, variant):
    """pickle_module given and weights_only unset means weights_only=False in torch."""
    t, c = load_both(saved("custom_object", variant), "str", pickle_module=pickle)
    assert t.exc is None
    assert_conform(t, c)


# ---------------------------------------------------------------------------------------
# TORCH_FORCE_* environment variables
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("weights_only", [None, False, True])
@pytest.mark.parametrize("name", ["custom_object", "plain_dict"])
def test_force_weights_only_env(saved, monkeypatch, name, weights_only):
    monkeypatch.setenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "1")
    t, c = load_both(saved(name, "zip"), "str", weights_only=weights_only)
    if name == "custom_object":
        assert isinstance(t.exc, pickle.UnpicklingError)
        assert isinstance(c.exc, pickle.UnpicklingError), repr(c.exc)
        assert c.warnings == t.warnings
    else:
        assert_conform(t, c)


@pytest.mark.parametrize("weights_only", [None, False, True])
@pytest.mark.parametrize("name", ["custom_object", "plain_dict"])
def test_force_no_weights_only_env(saved, monkeypatch, ckptd_mod, name, weights_only):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "true")
    path = saved(name, "zip")
    if weights_only is None:
        # torch warns that it forces weights_only=False; ckptd must warn the same way.
        with pytest.warns(UserWarning, match="TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD") as tw:
            expected = torch.load(path)
        with pytest.warns(UserWarning, match="TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD") as cw:
            actual = ckptd_mod.load(path)
        assert [str(w.message) for w in cw] == [str(w.message) for w in tw]
        assert_same(expected, actual)
        return
    t, c = load_both(path, "str", weights_only=weights_only)
    if name == "custom_object" and weights_only:
        assert isinstance(t.exc, pickle.UnpicklingError)
        assert isinstance(c.exc, ckptd_mod.UnpicklingError), repr(c.exc)
    else:
        assert_conform(t, c)


def test_force_both_env_raises(saved, monkeypatch):
    monkeypatch.setenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "1")
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "yes")
    t, c = load_both(saved("plain_dict", "zip"), "str")
    assert isinstance(t.exc, RuntimeError) and "both were set" in str(t.exc)
    assert_conform(t, c)


# ---------------------------------------------------------------------------------------
# Streams
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["zip", "legacy"])
def test_non_seekable_stream(saved, ckptd_mod, variant):
    data = saved("plain_dict", variant).read_bytes()
    with pytest.raises(Exception) as texc:
        torch.load(NonSeekable(data))
    with pytest.raises(Exception) as cexc:
        ckptd_mod.load(NonSeekable(data))
    assert isinstance(cexc.value, type(texc.value)), (type(cexc.value).__mro__, texc.value)
    assert isinstance(cexc.value, ckptd_mod.NotSeekableError)
    assert "seekable" in str(cexc.value)


@pytest.mark.parametrize("variant", ["zip", "legacy"])
def test_file_object_at_an_offset(saved, tmp_path, variant):
    """torch.load reads from the stream's current position; a checkpoint after a header."""
    data = saved("views_and_ties", variant).read_bytes()
    path = tmp_path / "embedded.bin"
    path.write_bytes(b"HEADER--" * 8 + data)
    results = []
    import ckptd

    for loader in (torch.load, ckptd.load):
        with open(path, "rb") as f:
            f.seek(64)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                results.append(loader(f))
    assert_same(*results)


def test_bytesio_is_not_consumed_differently(saved):
    """The same BytesIO object can be loaded twice after seeking back, by either loader."""
    import ckptd

    buf = io.BytesIO(saved("plain_dict", "zip").read_bytes())
    a = torch.load(buf)
    buf.seek(0)
    b = ckptd.load(buf)
    assert_same(a, b)


# ---------------------------------------------------------------------------------------
# Devices (this machine has no CUDA in CI; real-GPU variants are marked gpu)
# ---------------------------------------------------------------------------------------

CUDA_MAPS = {
    "str_cuda0": lambda: "cuda:0",
    "device_cuda": lambda: torch.device("cuda"),
    "dict_cpu_to_cuda1": lambda: {"cpu": "cuda:1"},
}


@pytest.fixture(scope="module")
def cuda_tagged(tmp_path_factory):
    """A checkpoint whose storages are tagged 'cuda:1', saved on CPU (zip and legacy)."""
    root = tmp_path_factory.mktemp("cuda_tagged")
    obj = CORPUS["views_and_ties"].build()
    paths = {}
    with saved_as("cuda:1"):  # torch.save asks serialization.location_tag for each storage's tag
        for variant in ("zip", "legacy"):
            p = root / f"cuda1.{variant}.pt"
            p.write_bytes(save_bytes(obj, variant))
            paths[variant] = p
    for p in paths.values():
        assert b"cuda:1" in p.read_bytes() or b"cuda:1" in _zip_pickle(p)
    return paths


def _zip_pickle(path) -> bytes:
    import zipfile

    try:
        z = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        return b""
    return z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
@pytest.mark.parametrize("variant", ["zip", "legacy"])
@pytest.mark.parametrize("ml", list(CUDA_MAPS))
def test_cuda_map_location_without_cuda(saved, ckptd_mod, ml, variant):
    t, c = load_both(saved("views_and_ties", variant), "str", map_location=CUDA_MAPS[ml]())
    assert isinstance(t.exc, RuntimeError), t.exc
    assert isinstance(c.exc, ckptd_mod.DeviceError), repr(c.exc)
    assert_conform(t, c)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
@pytest.mark.parametrize("variant", ["zip", "legacy"])
def test_cuda_tagged_file_without_cuda(cuda_tagged, ckptd_mod, variant):
    t, c = load_both(cuda_tagged[variant], "str")
    assert isinstance(t.exc, RuntimeError), t.exc
    assert isinstance(c.exc, ckptd_mod.DeviceError), repr(c.exc)
    assert_conform(t, c)


@pytest.mark.parametrize("variant", ["zip", "legacy"])
@pytest.mark.parametrize(
    "ml",
    [lambda: {"cuda:1": "cpu"}, lambda: "cpu", lambda: torch.device("cpu"), LocationRecorder],
    ids=["dict", "str", "device", "recorder"],
)
def test_cuda_tagged_file_mapped_to_cpu(cuda_tagged, variant, ml):
    t, c, trec, crec = load_both(cuda_tagged[variant], "bytes", map_location_factory=ml)
    if isinstance(trec, LocationRecorder):
        # The recorder returns None, so torch restores to cuda:1 itself: an error without
        # two GPUs, which ckptd must raise too (as a DeviceError).
        assert_conform(t, c)
        if t.exc is not None:
            assert isinstance(c.exc, __import__("ckptd").DeviceError), repr(c.exc)
        assert {call[1] for call in trec.calls} == {"cuda:1"}
        assert [x[1:3] for x in crec.calls] == [x[1:3] for x in trec.calls]
        return
    assert t.exc is None, t.exc
    assert_conform(t, c)


def test_device_error_is_a_runtime_error(ckptd_mod):
    assert issubclass(ckptd_mod.DeviceError, RuntimeError)
    assert issubclass(ckptd_mod.DeviceError, ckptd_mod.CkptdError)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["zip", "legacy", "zip_big"])
@pytest.mark.parametrize("ml", ["cuda:0", "cuda", "dict", "tagged"])
def test_cuda_targets_on_gpu(saved, cuda_tagged, variant, ml):
    if ml == "tagged":
        if variant == "zip_big":
            pytest.skip("no big-endian tagged file")
        if torch.cuda.device_count() < 2:
            maps = {"map_location": {"cuda:1": "cuda:0"}}
        else:
            maps = {}
        t, c = load_both(cuda_tagged[variant], "str", **maps)
    else:
        ml_arg = {"cuda:0": "cuda:0", "cuda": torch.device("cuda"), "dict": {"cpu": "cuda:0"}}[ml]
        t, c = load_both(saved("views_and_ties", variant), "str", map_location=ml_arg)
    assert t.exc is None, t.exc
    assert_conform(t, c)


# ---------------------------------------------------------------------------------------
# The comparison helper itself must be strict, or every test above proves nothing.
# ---------------------------------------------------------------------------------------


def _fails(a, b) -> bool:
    try:
        assert_same(a, b)
    except AssertionError:
        return True
    return False


def test_assert_same_is_strict():
    x = torch.arange(6.0)
    y = x.clone()
    # sharing: torch shares, "ckptd" does not
    assert _fails({"a": x, "b": x[1:]}, {"a": y, "b": y.clone()[1:]})
    # same values, different storage offset / size
    assert _fails({"a": x[1:]}, {"a": x[1:].clone()})
    # stride
    m = torch.arange(6.0).reshape(2, 3)
    assert _fails(m.t(), m.t().contiguous())
    # dtype / type / requires_grad / key order
    assert _fails(torch.ones(2), torch.ones(2, dtype=torch.float64))
    assert _fails(torch.nn.Parameter(torch.ones(2)), torch.ones(2))
    assert _fails(torch.ones(2).requires_grad_(), torch.ones(2))
    assert _fails({"a": 1, "b": 2}, {"b": 2, "a": 1})
    assert _fails({"a": 1}, __import__("collections").OrderedDict(a=1))
    assert _fails((1, 2), [1, 2])
    # NaN payloads and -0.0 are compared bitwise
    assert not _fails(torch.tensor([float("nan")]), torch.tensor([float("nan")]))
    assert _fails(torch.tensor([0.0]), torch.tensor([-0.0]))
    # identity: one object twice vs two equal objects
    assert _fails({"a": x, "b": x}, {"a": y, "b": y.clone()})
    # python attributes on tensors and dicts
    s1 = torch.ones(2).as_subclass(TaggedTensor)
    s2 = torch.ones(2).as_subclass(TaggedTensor)
    s1.tag, s2.tag = "a", "b"
    assert _fails(s1, s2)
    d1, d2 = __import__("collections").OrderedDict(), __import__("collections").OrderedDict()
    d1._metadata = {"": {"version": 1}}
    assert _fails(d1, d2)
    # the self-comparison passes
    assert not _fails(CORPUS["views_and_ties"].build(), CORPUS["views_and_ties"].build())
    assert not _fails(CORPUS["quantized"].build(), CORPUS["quantized"].build())


# ---------------------------------------------------------------------------------------
# Less common ways torch.save writes a file
# ---------------------------------------------------------------------------------------

SAVE_OPTIONS = {
    "no_byteorder_record": {"_disable_byteorder_record": True},
    "protocol4": {"pickle_protocol": 4},
    "protocol5": {"pickle_protocol": 5},
    "legacy_protocol4": {"pickle_protocol": 4, "_use_new_zipfile_serialization": False},
    "alignment4096": {},
    "alignment1": {},
}


@pytest.mark.parametrize("option", list(SAVE_OPTIONS))
@pytest.mark.parametrize("name", ["views_and_ties", "all_dtypes", "quantized", "adam_state"])
def test_save_options(tmp_path, name, option):
    from torch.utils.serialization import config

    if name == "all_dtypes" and option.startswith("legacy"):
        pytest.skip("torch's legacy format cannot load the newer dtypes")
    path = tmp_path / f"{name}.{option}.pt"
    previous = config.save.storage_alignment
    if option.startswith("alignment"):
        config.save.storage_alignment = int(option[len("alignment"):])
    try:
        torch.save(CORPUS[name].build(), path, **SAVE_OPTIONS[option])
    finally:
        config.save.storage_alignment = previous
    # torch's weights-only unpickler rejects protocol 4+ (FRAME): ckptd must fail the same way.
    t, c = load_both(path, "str", weights_only=True)
    assert_conform(t, c, same_message=False)  # ckptd's weights-only message names the file
    weights_only = t.exc is None
    if not weights_only:
        assert "protocol" in option and isinstance(c.exc, pickle.UnpicklingError)
    for form in ("str", "bytes"):
        t, c = load_both(path, form, weights_only=weights_only)
        assert t.exc is None, t.exc
        assert_conform(t, c)
    t, c, trec, crec = load_both(path, "file", weights_only=weights_only, map_location_factory=LocationRecorder)
    assert_conform(t, c)
    _check_recorders("legacy" if option.startswith("legacy") else "zip", trec, crec)


@pytest.mark.parametrize("variant", ["zip", "zip_big"])
@pytest.mark.parametrize("ml", ["recorder", "str_cpu", "lambda_identity"])
def test_mmap_with_map_location(saved, variant, ml):
    t, c, trec, crec = load_both(saved("views_and_ties", variant), "str", mmap=True, map_location_factory=MAP_LOCATIONS[ml])
    assert_conform(t, c)
    _check_recorders(variant, trec, crec)


def test_safetensors_path(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    save_file({"a": torch.randn(3, 4), "b": torch.arange(5), "c": torch.ones(2, dtype=torch.bfloat16)}, str(path))
    for ml in (None, "cpu", torch.device("cpu")):
        t, c = load_both(path, "str", map_location=ml)
        assert t.exc is None, t.exc
        assert_conform(t, c)
    for ml in ({"cpu": "cpu"}, lambda s, loc: s):
        t, c = load_both(path, "str", map_location=ml)
        assert isinstance(t.exc, RuntimeError)
        assert_conform(t, c)


@pytest.mark.parametrize("form", ["str", "bytes", "bytesio"])
def test_tensors_outlive_the_load(saved, ckptd_mod, form):
    """A tensor kept alone (its dict, the source, the arena handle all dropped) stays valid."""
    import gc

    path = saved("views_and_ties", "zip")
    expected = torch.load(path)["slice"].clone()
    f = {"str": str(path), "bytes": path.read_bytes(), "bytesio": io.BytesIO(path.read_bytes())}[form]
    view = ckptd_mod.load(f)["slice"]
    del f
    for _ in range(3):
        gc.collect()
    junk = [torch.full((1 << 16,), 7.0) for _ in range(16)]  # reuse freed memory, if any
    assert torch.equal(view, expected)
    del junk
