"""Checkpoints: a pickle-free safetensors round trip, clear errors for bad files, atomic writes."""

import json
import os
import stat
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("safetensors", reason="safetensors is not installed: checkpoints need it (pip install safetensors)")

from safetensors import safe_open  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

from npyrnn import backend  # noqa: E402
from npyrnn import files as npyrnn_files  # noqa: E402
from npyrnn.checkpoint import FORMAT, FORMAT_VERSION, CheckpointError, load_checkpoint, save_checkpoint  # noqa: E402
from npyrnn.data import Vocab  # noqa: E402
from npyrnn.models import RNNLM  # noqa: E402
from npyrnn.train import predict  # noqa: E402

from conftest import one_line  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TEXT = "the quick brown fox jumps over the lazy dog "  # every letter: vocabulary of 28
H = 8
NAMES_1_LAYER = [
    "rnn.weight_ih_l0",
    "rnn.weight_hh_l0",
    "rnn.bias_ih_l0",
    "rnn.bias_hh_l0",
    "linear.weight",
    "linear.bias",
]
EXTRA = {"token": "char", "corpus": "tiny", "lr": 1.0, "note": "ünïcode ✓", "nested": {"list": [1, 2, 3]}}


def make_vocab():
    return Vocab(list(TEXT))


def make_model(vocab, **kwargs):
    # 'uniform' so that weights and biases are all non-zero and generation is not trivial
    return RNNLM(len(vocab), H, init="uniform", seed=3, **kwargs)


def host_state(model):
    return {k: backend.to_numpy(v).copy() for k, v in model.state_dict().items()}


def assert_same_weights(model, expected):
    got = host_state(model)
    assert list(got) == list(expected)
    for name, value in expected.items():
        assert got[name].dtype == value.dtype, name
        assert got[name].shape == value.shape, name
        assert np.array_equal(got[name], value), f"{name} differs after the round trip"


@pytest.fixture
def checkpoint(tmp_path):
    """A good checkpoint written on numpy; returns (path, host weights, vocab)."""
    vocab = make_vocab()
    model = make_model(vocab)
    path = tmp_path / "model.safetensors"
    save_checkpoint(path, model, vocab, extra=EXTRA)
    return path, host_state(model), vocab


# --------------------------------------------------------------------------- round trip


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"dtype": "float64"},
        {"num_layers": 2, "bidirectional": True, "nonlinearity": "relu"},
        {"num_layers": 2, "dtype": "float64", "nonlinearity": "relu"},
    ],
    ids=["float32", "float64", "2-layer-bidirectional-relu", "2-layer-float64"],
)
def test_round_trip_is_exact(tmp_path, kwargs):
    vocab = make_vocab()
    model = make_model(vocab, **kwargs)
    path = tmp_path / "model.safetensors"
    save_checkpoint(path, model, vocab, extra=EXTRA)

    loaded, loaded_vocab, extra = load_checkpoint(path)

    assert isinstance(loaded, RNNLM)
    assert loaded.config == model.config
    assert loaded.dtype == kwargs.get("dtype", "float32")
    assert_same_weights(loaded, host_state(model))
    assert loaded_vocab.idx_to_token == vocab.idx_to_token
    assert loaded_vocab.token_to_idx == vocab.token_to_idx
    assert loaded_vocab.token_freqs == vocab.token_freqs
    assert extra == EXTRA
    # the reloaded model generates exactly what the original does, greedy and sampled
    for kw in ({}, {"temperature": 1.0, "top_k": 3, "seed": 5}):
        assert predict("the lazy", 40, loaded, loaded_vocab, **kw) == predict("the lazy", 40, model, vocab, **kw)


def test_extra_defaults_to_empty_dict(tmp_path):
    vocab = make_vocab()
    path = tmp_path / "model.safetensors"
    save_checkpoint(path, make_model(vocab), vocab)
    assert load_checkpoint(path)[2] == {}


def test_file_written_on_numpy_loads_on_each_backend(tmp_path, xp):
    target = backend.name
    backend.set_backend("numpy")
    vocab = make_vocab()
    model = make_model(vocab, num_layers=2)
    path = tmp_path / "model.safetensors"
    save_checkpoint(path, model, vocab)
    expected = host_state(model)
    expected_text = predict("the quick", 30, model, vocab, temperature=0.7, top_k=4, seed=1)

    backend.set_backend(target)
    loaded, loaded_vocab, _ = load_checkpoint(path)

    for name, p in loaded.params.items():
        assert backend.get_array_module(p) is xp, f"{name} is not on {target}"
    assert_same_weights(loaded, expected)
    # the sampling draws on the host from the seed, so both backends generate the same text
    assert predict("the quick", 30, loaded, loaded_vocab, temperature=0.7, top_k=4, seed=1) == expected_text


def test_file_written_on_each_backend_loads_on_numpy(tmp_path, xp):
    vocab = make_vocab()
    model = make_model(vocab)
    assert backend.get_array_module(model.params["linear.weight"]) is xp
    path = tmp_path / "model.safetensors"
    save_checkpoint(path, model, vocab)
    expected = host_state(model)

    backend.set_backend("numpy")
    loaded, _, _ = load_checkpoint(path)
    assert isinstance(loaded.params["linear.weight"], np.ndarray)
    assert_same_weights(loaded, expected)


# --------------------------------------------------------------------------- the file format


def test_file_is_plain_safetensors_with_state_dict_names(checkpoint):
    path, expected, vocab = checkpoint
    V = len(vocab)

    tensors = load_file(str(path))  # the stock reader, no npyrnn involved

    assert sorted(tensors) == sorted(NAMES_1_LAYER)
    shapes = {
        "rnn.weight_ih_l0": (H, V),
        "rnn.weight_hh_l0": (H, H),
        "rnn.bias_ih_l0": (H,),
        "rnn.bias_hh_l0": (H,),
        "linear.weight": (V, H),
        "linear.bias": (V,),
    }
    for name, shape in shapes.items():
        assert tensors[name].shape == shape, name
        assert tensors[name].dtype == np.float32, name
        assert np.array_equal(tensors[name], expected[name]), name
    with safe_open(str(path), framework="numpy") as f:
        metadata = f.metadata()
    assert metadata["format"] == FORMAT
    assert metadata["format_version"] == FORMAT_VERSION
    assert json.loads(metadata["vocab"])["idx_to_token"] == vocab.idx_to_token
    assert json.loads(metadata["config"])["num_hiddens"] == H
    assert json.loads(metadata["extra"]) == EXTRA


def test_file_is_a_json_header_and_raw_tensor_bytes(checkpoint):
    """safetensors layout: u64 little-endian header length, a JSON header, then the raw data (no pickle)."""
    path, expected, _ = checkpoint
    data = path.read_bytes()

    (header_len,) = struct.unpack("<Q", data[:8])
    assert 0 < header_len < len(data) - 8
    header = json.loads(data[8 : 8 + header_len].decode("utf-8"))

    assert header["__metadata__"]["format"] == FORMAT
    body = data[8 + header_len :]
    tensor_names = [k for k in header if k != "__metadata__"]
    assert sorted(tensor_names) == sorted(NAMES_1_LAYER)
    assert max(header[k]["data_offsets"][1] for k in tensor_names) == len(body)
    for name in tensor_names:
        entry = header[name]
        assert entry["dtype"] == "F32"
        start, end = entry["data_offsets"]
        raw = np.frombuffer(body[start:end], dtype="<f4").reshape(entry["shape"])
        assert np.array_equal(raw, expected[name]), name


# --------------------------------------------------------------------------- bad files


def expect_error(path, *words):
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert "\n" not in message, message
    assert repr(str(path)) in message, message  # names the file
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
    return message


def rewrite(source, target, tensors=None, drop=(), **metadata_changes):
    """Copy a checkpoint with some tensors replaced or dropped, or metadata entries changed.

    The copy has no `sha256` entry, like a file written before npyrnn stored one, so that the
    checks after the digest's are what fails (test_runs.py tests the digest).
    """
    with safe_open(str(source), framework="numpy") as f:
        metadata = dict(f.metadata())
    metadata.pop("sha256", None)
    metadata.update(metadata_changes)
    stored = load_file(str(source))
    stored.update(tensors or {})
    for name in drop:
        del stored[name]
    save_file(stored, str(target), metadata=metadata)
    return target


def test_missing_file(tmp_path):
    expect_error(tmp_path / "nope.safetensors", "no such file")


def test_directory(tmp_path):
    expect_error(tmp_path, "directory")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.safetensors"
    path.write_bytes(b"")
    expect_error(path, "not a readable safetensors file")


@pytest.mark.parametrize("header_len", [None, 40], ids=["random-length", "small-length"])
def test_random_bytes(tmp_path, header_len):
    data = np.random.default_rng(0).bytes(4096)
    if header_len is not None:  # a believable header length, followed by bytes that are not JSON
        data = struct.pack("<Q", header_len) + data[8:]
    path = tmp_path / "random.safetensors"
    path.write_bytes(data)
    expect_error(path, "not a readable safetensors file")


def test_truncated_checkpoint(checkpoint):
    path, _, _ = checkpoint
    data = path.read_bytes()
    half = path.with_name("half.safetensors")
    half.write_bytes(data[: len(data) // 2])
    expect_error(half, "not a readable safetensors file", "truncated")


def test_safetensors_file_without_our_metadata(tmp_path, checkpoint):
    path, _, _ = checkpoint
    other = tmp_path / "other.safetensors"
    save_file(load_file(str(path)), str(other))  # the same tensors, no npyrnn metadata
    expect_error(other, "not an npyrnn", "format None")


def test_wrong_tensor_shape(tmp_path, checkpoint):
    path, _, _ = checkpoint
    bad = rewrite(path, tmp_path / "bad.safetensors", tensors={"rnn.weight_hh_l0": np.zeros((H + 1, H), "float32")})
    expect_error(bad, "rnn.weight_hh_l0", f"expected ({H}, {H}), got ({H + 1}, {H})")


def test_missing_tensor(tmp_path, checkpoint):
    path, _, _ = checkpoint
    bad = rewrite(path, tmp_path / "bad.safetensors", drop=["linear.bias"])
    expect_error(bad, "missing", "linear.bias")


def test_unexpected_tensor(tmp_path, checkpoint):
    path, _, _ = checkpoint
    bad = rewrite(path, tmp_path / "bad.safetensors", tensors={"rnn.weight_hh_l1": np.zeros((H, H), "float32")})
    expect_error(bad, "unexpected", "rnn.weight_hh_l1")


def test_wrong_format_version(tmp_path, checkpoint):
    path, _, _ = checkpoint
    bad = rewrite(path, tmp_path / "bad.safetensors", format_version="2")
    expect_error(bad, "format version '2'", "not supported")


def test_vocab_size_does_not_match_config(tmp_path, checkpoint):
    path, _, vocab = checkpoint
    short = {"idx_to_token": vocab.idx_to_token[:-1], "token_freqs": []}
    bad = rewrite(path, tmp_path / "bad.safetensors", vocab=json.dumps(short))
    expect_error(bad, f"vocabulary has {len(vocab) - 1} tokens", f"vocab_size={len(vocab)}")


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"config": "{not json"}, ["damaged metadata"]),
        ({"config": "[28, 8]"}, ["damaged metadata", "'config'"]),
        ({"extra": "[1, 2]"}, ["damaged metadata", "'extra'"]),
        ({"vocab": json.dumps({"idx_to_token": ["a", "b"]})}, ["damaged metadata"]),
        ({"config": json.dumps({"vocab_size": 28, "num_hiddens": 0})}, ["bad model config"]),
        ({"config": json.dumps({"vocab_size": 28, "num_hiddens": H, "colour": "red"})}, ["bad model config"]),
    ],
    ids=["config-not-json", "config-not-object", "extra-not-object", "bad-vocab", "hidden-0", "unknown-key"],
)
def test_damaged_metadata(tmp_path, checkpoint, changes, words):
    path, _, _ = checkpoint
    bad = rewrite(path, tmp_path / "bad.safetensors", **changes)
    expect_error(bad, *words)


# --------------------------------------------------------------------------- atomic writes


def fail(*args, **kwargs):
    raise OSError(28, "No space left on device")


@pytest.mark.parametrize("where", ["replace", "fsync"])
def test_failed_write_keeps_previous_file_and_leaves_no_temp_file(checkpoint, monkeypatch, where):
    path, expected, vocab = checkpoint
    before = path.read_bytes()
    other = RNNLM(len(vocab), H, init="uniform", seed=99)
    monkeypatch.setattr(npyrnn_files.os, where, fail)

    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(path, other, vocab)

    monkeypatch.undo()
    assert sorted(os.listdir(path.parent)) == ["model.safetensors"]
    assert path.read_bytes() == before
    assert_same_weights(load_checkpoint(path)[0], expected)


def test_interrupted_write_leaves_no_temp_file(checkpoint, monkeypatch):
    path, _, vocab = checkpoint
    before = path.read_bytes()

    def interrupt(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(npyrnn_files.os, "fsync", interrupt)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, make_model(vocab, dtype="float64"), vocab)
    monkeypatch.undo()
    assert sorted(os.listdir(path.parent)) == ["model.safetensors"]
    assert path.read_bytes() == before


def test_save_into_missing_directory_fails_without_leftovers(tmp_path):
    vocab = make_vocab()
    with pytest.raises(FileNotFoundError):
        save_checkpoint(tmp_path / "no" / "model.safetensors", make_model(vocab), vocab)
    assert os.listdir(tmp_path) == []


def test_overwrite_replaces_content_with_usual_permissions(checkpoint):
    path, _, vocab = checkpoint
    other = RNNLM(len(vocab), H, init="uniform", seed=99)
    save_checkpoint(path, other, vocab)
    assert_same_weights(load_checkpoint(path)[0], host_state(other))
    umask = os.umask(0)
    os.umask(umask)
    # not mkstemp's 0600: the mode a plain open() would have given
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    assert sorted(os.listdir(path.parent)) == ["model.safetensors"]


def odd_dtype_file(tmp_path, dtype):
    """A safetensors file, written by hand, with one tensor `w` of 4 BF16 or FP8 (E4M3) numbers."""
    nbytes = {"BF16": 8, "F8_E4M3": 4}[dtype]
    header = json.dumps({"w": {"dtype": dtype, "shape": [4], "data_offsets": [0, nbytes]},
                         "__metadata__": {"format": "npyrnn.rnnlm"}}).encode()
    header += b" " * (-len(header) % 8)
    path = tmp_path / "odd.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(range(1, nbytes + 1)))
    return path


@pytest.mark.parametrize("dtype", ["BF16", "F8_E4M3"])
def test_a_dtype_npyrnn_does_not_read_is_one_clear_error(tmp_path, dtype):
    """A file holding bfloat16 or FP8 (written by hand: numpy has neither) is reported, not a traceback.

    The same message whether or not ml_dtypes has taught numpy those dtypes: on the GPU machine
    some test had imported it, and the file then loaded as far as its (missing) metadata.
    """
    path = odd_dtype_file(tmp_path, dtype)
    message = rf"odd.safetensors.*dtype npyrnn does not read: w \({dtype}\); convert them to F32 or F64"
    with pytest.raises(CheckpointError, match=message) as info:
        load_checkpoint(path)
    one_line(info)


@pytest.mark.parametrize("dtype", ["BF16", "F8_E4M3"])
def test_a_dtype_npyrnn_does_not_read_is_refused_even_where_numpy_knows_it(tmp_path, dtype):
    """With ml_dtypes imported (JAX imports it), numpy reads BF16 and FP8: still the same one-line error.

    In a child process, so that this process's numpy stays as the other tests expect.
    """
    pytest.importorskip("ml_dtypes", reason="ml_dtypes is not installed (it comes with jax: pip install -e '.[bench]')")
    path = odd_dtype_file(tmp_path, dtype)
    code = ("import sys, ml_dtypes, numpy; numpy.dtype(sys.argv[2]);"
            "from npyrnn.checkpoint import CheckpointError, load_checkpoint\n"
            "try:\n    load_checkpoint(sys.argv[1])\nexcept CheckpointError as e:\n    print(e)")
    numpy_name = {"BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn"}[dtype]
    result = subprocess.run([sys.executable, "-c", code, str(path), numpy_name], capture_output=True, text=True,
                            timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert f"dtype npyrnn does not read: w ({dtype}); convert them to F32 or F64" in result.stdout, result.stdout
