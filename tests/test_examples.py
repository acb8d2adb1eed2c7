"""Smoke tests of examples/*.py: each runs as a script, with tiny sizes, and prints what it promises."""

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from npyrnn import backend
from npyrnn.checkpoint import load_checkpoint

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TIMEMACHINE = Path(os.environ.get("NPYRNN_DATA_DIR", "/nonexistent")) / "timemachine.txt"

TINY = ["--epochs", "3", "--hidden", "16", "--max-tokens", "2000", "--batch-size", "4", "--num-steps", "8"]
LAST_LINE = re.compile(r"perplexity (\d+\.\d), (\d+\.\d) tokens/s on numpy")


def run_example(name, args, cwd, env_changes=None):
    env = dict(os.environ)
    env["NPYRNN_DATA_DIR"] = str(TIMEMACHINE.parent.resolve())  # absolute, as cwd differs: nothing downloads
    env.pop("NPYRNN_BACKEND", None)
    env.update(env_changes or {})
    return subprocess.run([sys.executable, str(EXAMPLES / name), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


SCRIPTS = sorted(p.name for p in EXAMPLES.glob("*.py"))


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_example_says_what_it_shows_and_how_to_run_it(name):
    doc = ast.get_docstring(ast.parse((EXAMPLES / name).read_text()))
    assert doc and "What it shows" in doc, name
    assert f"python examples/{name}" in doc, name


def test_every_example_is_run_by_a_test():
    source = Path(__file__).read_text()
    run = set(re.findall(r'run_example\("([\w.]+)"', source)) | set(re.findall(r'\("(\w+\.py)", "\w+"\)', source))
    assert SCRIPTS, "no examples found"
    missing = [name for name in SCRIPTS if name not in run]
    assert not missing, f"examples without a smoke test here: {missing}"


@pytest.mark.parametrize("name, kind", [("train_sequential.py", "sequential"), ("train_random.py", "random")])
def test_train_example(tmp_path, name, kind):
    result = run_example(name, [*TINY, "--out", "run"], tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("2000 tokens, vocabulary 28, ") and f"{kind} sampling, hidden 16" in lines[0]
    assert [line.split(":")[0] for line in lines[1:4]] == ["epoch 1", "epoch 2", "epoch 3"]
    assert LAST_LINE.fullmatch(lines[4]), lines[4]
    assert lines[5].startswith("time traveller") and len(lines[5]) == len("time traveller") + 50
    assert lines[6].startswith("traveller") and len(lines[6]) == len("traveller") + 50
    assert lines[7] == "saved run/model.safetensors"
    model, vocab, extra = load_checkpoint(tmp_path / "run" / "model.safetensors")
    assert model.config["num_hiddens"] == 16 and len(vocab) == 28
    assert extra["random_iter"] is (kind == "random") and extra["epochs"] == 3
    assert f"{extra['perplexity']:.1f}" == LAST_LINE.fullmatch(lines[4]).group(1)


def test_train_example_defaults_are_d2l_settings():
    sys.path.insert(0, str(EXAMPLES))
    try:
        import train_sequential
    finally:
        sys.path.remove(str(EXAMPLES))
    args = train_sequential.parse_args([], "runs/x")
    assert (args.hidden, args.epochs, args.lr, args.batch_size, args.num_steps, args.max_tokens) == (
        512, 500, 1.0, 32, 35, 10000)


def test_generate_example_reads_a_trained_checkpoint(tmp_path):
    trained = run_example("train_sequential.py", [*TINY, "--out", "run"], tmp_path)
    assert trained.returncode == 0, trained.stderr
    args = ["--checkpoint", "run/model.safetensors", "--prefix", "the time", "--length", "30", "--seed", "3"]
    result = run_example("generate.py", args, tmp_path)
    assert result.returncode == 0, result.stderr
    greedy = [line for line in result.stdout.splitlines() if line.startswith("greedy:  ")]
    sampled = [line for line in result.stdout.splitlines() if line.startswith("sampled: ")]
    assert len(greedy) == 1 and len(sampled) == 1
    text = greedy[0].removeprefix("greedy:  ")
    assert text.startswith("the time") and len(text) == len("the time") + 30
    assert sampled[0].startswith("sampled: the time")
    assert "temperature 0.8, top-k 5, seed 3" in sampled[0]
    assert run_example("generate.py", args, tmp_path).stdout == result.stdout  # seeded: the same again

    missing = run_example("generate.py", ["--checkpoint", "nope.safetensors"], tmp_path)
    assert missing.returncode == 2
    assert missing.stderr.startswith("generate.py: checkpoint 'nope.safetensors': no such file")


def test_switch_backend_example_on_numpy(tmp_path):
    args = ["--epochs", "2", "--hidden", "8", "--max-tokens", "1000", "--batch-size", "4", "--num-steps", "8"]
    result = run_example("switch_backend.py", args, tmp_path, {"NPYRNN_BACKEND": "numpy"})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "NPYRNN_BACKEND=numpy -> backend.name = 'numpy', backend.xp = numpy"
    assert "minibatch X: numpy.ndarray (4, 8)" in lines[1]
    assert "rnn.weight_hh_l0: numpy.ndarray (8, 8) float32" in lines[1]
    assert LAST_LINE.fullmatch(lines[-1]), lines[-1]


@pytest.mark.skipif(backend.is_cupy_available(), reason="cupy runs here")
def test_switch_backend_example_explains_a_missing_cupy(tmp_path):
    result = run_example("switch_backend.py", ["--epochs", "1"], tmp_path, {"NPYRNN_BACKEND": "cupy"})
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("switch_backend.py: backend 'cupy' was requested")
    assert "NPYRNN_BACKEND=numpy" in result.stderr
