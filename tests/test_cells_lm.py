"""RNNLM with every cell: stepping, generation, training and evaluation modes, checkpoints, the CLI.

The layers themselves are checked against torch in tests/test_cells.py, the language model's
gradients and training against d2l's chapter 9 models in tests/test_cells_train.py.
"""

import json
import re

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from safetensors import safe_open

from npyrnn import backend
from npyrnn.checkpoint import DIGEST_KEY, load_checkpoint, save_checkpoint
from npyrnn.cli import main
from npyrnn.data import Vocab
from npyrnn.generate import generate_stream
from npyrnn.info import checkpoint_info
from npyrnn.models import RNNLM
from npyrnn.train import predict

TEXT = "the quick brown fox jumps over the lazy dog\n" * 12  # every letter: vocabulary 28
SMALL = ["--hidden", "12", "--batch-size", "4", "--num-steps", "8", "--seed", "0", "--max-tokens", "400",
         "--val-tokens", "100"]

MODELS = [
    dict(cell="rnn"),
    dict(cell="gru"),
    dict(cell="gru", reset_after=False),
    dict(cell="lstm"),
    dict(cell="lstm", proj_size=5),
    dict(cell="gru", num_layers=2, dropout=0.5),
    dict(cell="lstm", num_layers=2, proj_size=4, dropout=0.5),
]


def cfg_id(c):
    return "-".join(f"{k}={v}" for k, v in c.items())


def parts(state):
    return state if isinstance(state, tuple) else (state,)


def to_host(state):
    return [backend.to_numpy(s).copy() for s in parts(state)]


@pytest.fixture(scope="module")
def vocab():
    return Vocab(list(TEXT))


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def run(argv, capsys):
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


# --------------------------------------------------------------------------- stepping and generation


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("cfg", MODELS, ids=cfg_id)
def test_stepper_equals_forward_one_token_at_a_time(cfg, bidirectional, xp):
    """Evaluation mode: step(ids) after step(ids)... gives forward's logits and final state (float64).

    A bidirectional model has no step-by-step form: its stepper runs forward on each single token,
    which is what forward on one-token windows gives.
    """
    model = RNNLM(28, 10, dtype="float64", init="uniform", seed=1, bidirectional=bidirectional, **cfg)
    model.eval()
    rng = np.random.default_rng(2)
    B, T = 3, 6
    ids = xp.asarray(rng.integers(0, 28, size=(B, T)))
    state = model.begin_state(B)
    for s in parts(state):
        s[...] = xp.asarray(rng.standard_normal(s.shape))
    start = to_host(state)
    step = model.stepper(state)
    stepped = [backend.to_numpy(step(ids[:, t])).copy() for t in range(T)]
    if bidirectional:  # the reference: one forward per token, the state carried
        expected, carried = [], tuple(xp.asarray(s) for s in start)
        carried = carried if isinstance(state, tuple) else carried[0]
        for t in range(T):
            logits, carried = model.forward(ids[:, t:t + 1], carried)
            expected.append(backend.to_numpy(logits))
        final = to_host(carried)
    else:
        init = tuple(xp.asarray(s) for s in start)
        logits, final = model.forward(ids, init if isinstance(state, tuple) else init[0])
        expected = list(backend.to_numpy(logits).reshape(T, B, -1))
        final = to_host(final)
    for t in range(T):
        np.testing.assert_allclose(stepped[t], expected[t], rtol=1e-12, atol=1e-12, err_msg=f"step {t}")
    for ours, ref in zip(to_host(state), final):
        np.testing.assert_allclose(ours, ref, rtol=1e-12, atol=1e-12)
    assert not np.allclose(to_host(state)[0], start[0]), "the state did not move; the check would be empty"


@pytest.mark.parametrize("cfg", MODELS, ids=cfg_id)
def test_predict_and_generate_stream_for_every_cell(cfg, vocab):
    model = RNNLM(len(vocab), 10, init="uniform", seed=3, **cfg)
    model.train()
    greedy = predict("the quick", 15, model, vocab)
    assert greedy.startswith("the quick") and len(greedy.replace("<unk>", "?")) == len("the quick") + 15
    assert "".join(generate_stream("the quick", 15, model, vocab)) == greedy
    assert model.training, "generation must restore the model's mode"
    sampled = predict("the", 12, model, vocab, temperature=1.0, seed=5, num_samples=3)
    assert len(sampled) == 3 and all(s.startswith("the") for s in sampled)
    assert sampled == predict("the", 12, model, vocab, temperature=1.0, seed=5, num_samples=3)
    pieces = list(generate_stream("the", 12, model, vocab, temperature=1.0, seed=5, num_samples=3))
    joined = ["".join(p for i, p in pieces if i == k) for k in range(3)]
    assert joined == sampled
    model.eval()
    assert predict("the quick", 15, model, vocab) == greedy, "generation runs in evaluation mode"


# --------------------------------------------------------------------------- training and evaluation modes


@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
def test_train_draws_dropout_masks_and_eval_equals_no_dropout(cell, xp):
    kwargs = dict(num_layers=3, dtype="float64", init="uniform", seed=7, cell=cell)
    model, plain = RNNLM(28, 10, dropout=0.5, **kwargs), RNNLM(28, 10, **kwargs)
    for name, p in model.params.items():
        assert np.array_equal(backend.to_numpy(p), backend.to_numpy(plain.params[name])), name
    X = xp.asarray(np.random.default_rng(0).integers(0, 28, size=(4, 7)))
    reference = backend.to_numpy(plain.forward(X)[0])
    assert model.training
    first, second = (backend.to_numpy(model.forward(X)[0]).copy() for _ in range(2))
    assert not np.allclose(first, second), "training mode must draw new masks every forward"
    assert not np.allclose(first, reference)
    assert model.eval() is model and not model.training and not model.rnn.training
    a, b = (backend.to_numpy(model.forward(X)[0]).copy() for _ in range(2))
    assert np.array_equal(a, b) and np.array_equal(a, reference), "evaluation mode must equal dropout=0"
    model.train()
    assert model.training and model.rnn.training
    assert not np.allclose(backend.to_numpy(model.forward(X)[0]), reference)


def test_dropout_masks_follow_the_seed():
    X = backend.asarray(np.random.default_rng(0).integers(0, 28, size=(4, 7)))
    a, b, c = (RNNLM(28, 10, num_layers=2, dropout=0.3, cell="gru", seed=s) for s in (1, 1, 2))
    la, lb = backend.to_numpy(a.forward(X)[0]), backend.to_numpy(b.forward(X)[0])
    assert np.array_equal(la, lb)
    b.set_generator_state(a.generator_state())
    assert np.array_equal(backend.to_numpy(a.forward(X)[0]), backend.to_numpy(b.forward(X)[0])), \
        "the generator state fixes the next masks"
    assert not np.array_equal(la, backend.to_numpy(c.forward(X)[0]))


# --------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("cfg", MODELS, ids=cfg_id)
def test_checkpoint_round_trip_for_every_cell(cfg, vocab, tmp_path):
    model = RNNLM(len(vocab), 10, dtype="float64", init="uniform", seed=4, **cfg)
    path = tmp_path / "model.safetensors"
    save_checkpoint(path, model, vocab, extra={"token": "char"})
    loaded, loaded_vocab, extra = load_checkpoint(path)
    assert loaded.config == model.config and loaded.cell == cfg["cell"]
    assert list(loaded.params) == list(model.params)
    for name, p in model.params.items():
        assert np.array_equal(backend.to_numpy(loaded.params[name]), backend.to_numpy(p)), name
    assert loaded_vocab.idx_to_token == vocab.idx_to_token
    X = backend.asarray(np.random.default_rng(0).integers(0, len(vocab), size=(2, 5)))
    model.eval(), loaded.eval()
    assert np.array_equal(backend.to_numpy(model.forward(X)[0]), backend.to_numpy(loaded.forward(X)[0]))
    info = checkpoint_info(path)
    assert info["cell"] == cfg["cell"]
    assert info["nonlinearity"] == ("tanh" if cfg["cell"] == "rnn" else None)
    assert info["reset_after"] == (cfg.get("reset_after", True) if cfg["cell"] == "gru" else None)
    assert info["proj_size"] == (cfg.get("proj_size", 0) if cfg["cell"] == "lstm" else None)
    assert info["layers"] == cfg.get("num_layers", 1)
    assert info["parameters"] == sum(int(p.size) for p in model.params.values())


def test_a_checkpoint_from_before_the_cells_still_loads(vocab, tmp_path):
    """An RNN checkpoint whose config has only the keys npyrnn wrote before GRU and LSTM (no 'cell', 'dropout')."""
    model = RNNLM(len(vocab), 10, num_layers=2, nonlinearity="relu", seed=5)
    new = tmp_path / "new.safetensors"
    save_checkpoint(new, model, vocab, extra={"token": "char"})
    with safe_open(str(new), framework="numpy") as f:
        metadata = f.metadata()
    config = json.loads(metadata["config"])
    old_config = {k: config[k] for k in ("vocab_size", "num_hiddens", "num_layers", "bidirectional",
                                         "nonlinearity", "dtype")}
    assert set(config) - set(old_config) == {"cell", "dropout"}
    old = tmp_path / "old.safetensors"
    metadata = {k: v for k, v in metadata.items() if k != DIGEST_KEY}  # files of that time had no digest
    save_file(load_file(str(new)), str(old), metadata={**metadata, "config": json.dumps(old_config)})
    loaded, _, _ = load_checkpoint(old)
    assert loaded.cell == "rnn" and loaded.rnn.dropout == 0.0 and loaded.rnn.nonlinearity == "relu"
    for name, p in model.params.items():
        assert np.array_equal(backend.to_numpy(loaded.params[name]), backend.to_numpy(p)), name
    assert checkpoint_info(old)["cell"] == "rnn"


# --------------------------------------------------------------------------- the command line


@pytest.mark.parametrize("flags, cell, gates", [
    (["--cell", "gru"], "gru", 3),
    (["--cell", "gru", "--gru-reset", "before", "--layers", "2", "--dropout", "0.2"], "gru", 3),
    (["--cell", "lstm", "--proj-size", "4"], "lstm", 4),
], ids=["gru", "gru-before-2-layers-dropout", "lstm-proj"])
def test_cli_train_generate_info_gradcheck(flags, cell, gates, corpus, tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, stderr = run(["train", "--corpus", corpus, *SMALL, *flags, "--epochs", "3", "--quiet",
                                "--out", out], capsys)
    assert code == 0, stderr
    ckpt = out / "model.safetensors"
    model, _, extra = load_checkpoint(ckpt)
    assert model.cell == cell and model.rnn.GATES == gates
    assert model.params["rnn.weight_ih_l0"].shape[0] == gates * 12
    if "--gru-reset" in flags:
        assert model.rnn.reset_after is False and model.rnn.dropout == 0.2 and model.rnn.num_layers == 2
    if "--proj-size" in flags:
        assert model.rnn.proj_size == 4 and model.params["linear.weight"].shape == (28, 4)
    assert extra["cell"] == cell

    code, stdout, stderr = run(["generate", "--checkpoint", ckpt, "--prefix", "the quick", "--length", "20"], capsys)
    assert code == 0, stderr
    assert stdout.startswith("the quick") and len(stdout.rstrip("\n").replace("<unk>", "?")) == len("the quick") + 20

    code, stdout, stderr = run(["info", ckpt], capsys)
    assert code == 0, stderr
    shown = {"gru": "gru (reset after)", "lstm": "lstm (proj_size 4)"}[cell]
    if "--gru-reset" in flags:
        shown = "gru (reset before)"
    assert re.search(rf"^cell +{re.escape(shown)}$", stdout, re.MULTILINE), stdout

    code, stdout, stderr = run(["gradcheck", "--corpus", corpus, "--hidden", "6", "--batch-size", "2",
                                "--num-steps", "5", *[f if f != "4" else "3" for f in flags]], capsys)
    assert code == 0, stderr
    worst = re.fullmatch(rf"largest relative error (\S+) \((\S+)\) on {backend.name}: ok \(tolerance 1e-06\)",
                         stdout.splitlines()[-1])
    assert worst and float(worst.group(1)) < 1e-6, stdout


@pytest.mark.parametrize("command", ["train", "gradcheck"])
@pytest.mark.parametrize("flags, message", [
    (["--nonlinearity", "relu", "--cell", "gru"],
     "--nonlinearity applies to --cell rnn only; the GRU has its own gates"),
    (["--nonlinearity", "tanh", "--cell", "lstm"], "--nonlinearity applies to --cell rnn only; the LSTM has its own"),
    (["--gru-reset", "before", "--cell", "rnn"], "--gru-reset applies to --cell gru only"),
    (["--gru-reset", "after", "--cell", "lstm"], "--gru-reset applies to --cell gru only"),
    (["--proj-size", "4", "--cell", "rnn"], "--proj-size applies to --cell lstm only"),
    (["--proj-size", "4", "--cell", "gru"], "--proj-size applies to --cell lstm only"),
    (["--proj-size", "12", "--cell", "lstm"], "--proj-size 12 must be below --hidden 12"),
    (["--proj-size", "20", "--cell", "lstm"], "--proj-size 20 must be below --hidden 12"),
], ids=["relu-gru", "tanh-lstm", "reset-rnn", "reset-lstm", "proj-rnn", "proj-gru", "proj-eq-hidden", "proj-above"])
def test_cli_flags_of_another_cell_are_usage_errors(command, flags, message, corpus, tmp_path, capsys):
    out = tmp_path / "run"
    argv = [command, "--corpus", corpus, "--hidden", "12", *flags]
    if command == "train":
        argv += ["--out", out]
    code, stdout, stderr = run(argv, capsys)
    assert code == 2
    assert stderr.count("\n") == 1 and stderr == f"npyrnn: error: {stderr[len('npyrnn: error: '):]}"
    assert message in stderr, stderr
    assert not out.exists(), "a usage error must write nothing"


@pytest.mark.parametrize("value", ["1.0", "1", "-0.1", "nan", "x"])
def test_cli_dropout_outside_zero_one_is_rejected_by_argparse(value, corpus, tmp_path, capsys):
    code, _, stderr = run(["train", "--corpus", corpus, "--dropout", value, "--out", tmp_path / "run"], capsys)
    assert code == 2
    assert "argument --dropout" in stderr and "a number in [0, 1)" in stderr, stderr
    assert not (tmp_path / "run").exists()
