"""Smoke tests of examples/*.py: each runs as a script, with tiny sizes, and prints what it promises."""

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from npyrnn import backend
from npyrnn.checkpoint import load_checkpoint

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TIMEMACHINE = Path(os.environ.get("NPYRNN_DATA_DIR", "/nonexistent")) / "timemachine.txt"

TINY = ["--epochs", "3", "--hidden", "16", "--max-tokens", "2000", "--batch-size", "4", "--num-steps", "8"]

def last_line(on=None):
    """The examples' closing line; on the backend this session runs on (inherited by the child) unless `on`."""
    return re.compile(rf"perplexity (\d+\.\d), (\d+\.\d) tokens/s on {on or backend.name}")


def run_example(name, args, cwd, env_changes=None):
    env = dict(os.environ)
    env["NPYRNN_DATA_DIR"] = str(TIMEMACHINE.parent.resolve())  # absolute, as cwd differs: nothing downloads
    # NPYRNN_BACKEND and PYTHONPATH are inherited: the children run on the backend this session runs on
    env.update(env_changes or {})
    return subprocess.run([sys.executable, str(EXAMPLES / name), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


SCRIPTS = sorted(p.name for p in EXAMPLES.glob("*.py") if not p.name.startswith("_"))  # _entry.py is shared code


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
    assert last_line().fullmatch(lines[4]), lines[4]
    assert lines[5].startswith("time traveller") and len(lines[5]) == len("time traveller") + 50
    assert lines[6].startswith("traveller") and len(lines[6]) == len("traveller") + 50
    assert lines[7] == "saved run/model.safetensors"
    model, vocab, extra = load_checkpoint(tmp_path / "run" / "model.safetensors")
    assert model.config["num_hiddens"] == 16 and len(vocab) == 28
    assert extra["random_iter"] is (kind == "random") and extra["epochs"] == 3
    assert f"{extra['perplexity']:.1f}" == last_line().fullmatch(lines[4]).group(1)


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
    assert missing.stderr.startswith("generate.py: error: checkpoint 'nope.safetensors': no such file")


def test_switch_backend_example_on_numpy(tmp_path):
    args = ["--epochs", "2", "--hidden", "8", "--max-tokens", "1000", "--batch-size", "4", "--num-steps", "8"]
    result = run_example("switch_backend.py", args, tmp_path, {"NPYRNN_BACKEND": "numpy"})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "NPYRNN_BACKEND=numpy -> backend.name = 'numpy', backend.xp = numpy"
    assert "minibatch X: numpy.ndarray (4, 8)" in lines[1]
    assert "rnn.weight_hh_l0: numpy.ndarray (8, 8) float32" in lines[1]
    assert last_line("numpy").fullmatch(lines[-1]), lines[-1]


@pytest.mark.skipif(backend.is_cupy_available(), reason="cupy runs here")
def test_switch_backend_example_explains_a_missing_cupy(tmp_path):
    result = run_example("switch_backend.py", ["--epochs", "1"], tmp_path, {"NPYRNN_BACKEND": "cupy"})
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("switch_backend.py: error: backend 'cupy' was requested")
    assert "NPYRNN_BACKEND=numpy" in result.stderr


# ------------------------------------------------------------------ bad input: one line, exit 2, like the CLI

# a run of each script that gets past the flags, for the cases where the flags are fine and the rest is not
VALID = {
    "train_sequential.py": ["--epochs", "1", "--hidden", "8", "--out", "run"],
    "train_random.py": ["--epochs", "1", "--hidden", "8", "--out", "run"],
    "switch_backend.py": ["--epochs", "1", "--hidden", "8"],
    "generate.py": ["--checkpoint", "missing.safetensors"],
}
MISSING_INPUT = {  # the file each script reads, missing
    "train_sequential.py": (["--corpus", "missing.txt"], "corpus file 'missing.txt' not found"),
    "train_random.py": (["--corpus", "missing.txt"], "corpus file 'missing.txt' not found"),
    "switch_backend.py": (["--corpus", "missing.txt"], "corpus file 'missing.txt' not found"),
    "generate.py": ([], "checkpoint 'missing.safetensors': no such file"),
}
BAD_FLAGS = [
    ("train_sequential.py", ["--hidden", "0"], "argument --hidden: '0' is not a positive integer"),
    ("train_sequential.py", ["--epochs", "ten"], "argument --epochs: 'ten' is not a positive integer"),
    ("train_sequential.py", ["--lr", "-1"], "argument --lr: '-1' is not a positive number"),
    ("train_sequential.py", ["--bogus"], "unrecognized arguments: --bogus"),
    ("train_sequential.py", ["--out", ""], "argument --out: '' is not a folder name; give one"),
    ("train_random.py", ["--batch-size", "0"], "argument --batch-size: '0' is not a positive integer"),
    ("switch_backend.py", ["--max-tokens", "-5"], "argument --max-tokens: '-5' is not a positive integer"),
    ("generate.py", ["--length", "-1"], "argument --length: '-1' is not a non-negative integer"),
    ("generate.py", ["--temperature", "nan"], "argument --temperature: 'nan' is not a non-negative number"),
    ("generate.py", ["--top-p", "1.5"], "argument --top-p: '1.5' is not a number in (0, 1]"),
]


def assert_one_line_error(result, name, *expected):
    """Exit 2, exactly one line on stderr, `NAME: error: ...` holding each expected text, no traceback."""
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert result.stderr.count("\n") == 1 and result.stderr.endswith("\n"), result.stderr
    assert result.stderr.startswith(f"{name}: error: "), result.stderr
    for text in expected:
        assert text in result.stderr, result.stderr


@pytest.mark.parametrize("name, args, expected", BAD_FLAGS)
def test_bad_flag_is_one_line(tmp_path, name, args, expected):
    result = run_example(name, args, tmp_path)
    assert_one_line_error(result, name, expected, f"see `{name} --help`")
    assert result.stdout == ""


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_script_is_covered_by_the_bad_input_tables(name):
    assert name in VALID and name in MISSING_INPUT and any(row[0] == name for row in BAD_FLAGS)


@pytest.mark.parametrize("name", SCRIPTS)
def test_missing_input_file_is_one_line(tmp_path, name):
    extra, expected = MISSING_INPUT[name]
    result = run_example(name, [*VALID[name], *extra], tmp_path)
    assert_one_line_error(result, name, expected)
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(backend.is_cupy_available(), reason="cupy runs here")
@pytest.mark.parametrize("name", SCRIPTS)
def test_cupy_without_cupy_is_one_line(tmp_path, name):
    result = run_example(name, VALID[name], tmp_path, {"NPYRNN_BACKEND": "cupy"})
    assert_one_line_error(result, name, "backend 'cupy' was requested", "NPYRNN_BACKEND=numpy")
    assert result.stdout == ""


@pytest.mark.parametrize("name", SCRIPTS)
def test_unknown_backend_is_one_line(tmp_path, name):
    result = run_example(name, VALID[name], tmp_path, {"NPYRNN_BACKEND": "bogus"})
    assert_one_line_error(result, name, "unknown backend 'bogus'", "NPYRNN_BACKEND=numpy")
    assert result.stdout == ""


@pytest.mark.parametrize("name", ["train_sequential.py", "switch_backend.py"])
def test_model_beyond_memory_is_one_line_not_a_kill(tmp_path, name):
    result = run_example(name, [*VALID[name], "--hidden", "100000000"], tmp_path)
    assert_one_line_error(result, name, "GiB", "use a smaller --hidden")


def test_help_still_works_with_a_bad_backend(tmp_path):
    result = run_example("train_sequential.py", ["--help"], tmp_path, {"NPYRNN_BACKEND": "bogus"})
    assert result.returncode == 0 and result.stdout.startswith("usage: train_sequential.py") and result.stderr == ""


# ------------------------------------------------------------------ the shared entry point, in-process


@pytest.fixture(scope="module")
def entry():
    sys.path.insert(0, str(EXAMPLES))
    try:
        import _entry
    finally:
        sys.path.remove(str(EXAMPLES))
    return _entry


def test_entry_run_reports_bad_input_and_lets_bugs_through(entry, capsys, monkeypatch):
    from npyrnn.errors import DataError

    monkeypatch.setattr(sys, "argv", ["demo.py"])
    monkeypatch.delenv("NPYRNN_DEBUG", raising=False)

    def fails(exc):
        raise exc

    assert entry.run(lambda: 0) == 0
    assert entry.run(fails, DataError("the corpus is\nempty; give another")) == 2
    assert capsys.readouterr().err == "demo.py: error: the corpus is empty; give another\n"
    assert entry.run(fails, FileNotFoundError(2, "No such file or directory", "x.txt")) == 2
    assert capsys.readouterr().err == "demo.py: error: No such file or directory: x.txt\n"
    assert entry.run(fails, MemoryError("Unable to allocate 8 EiB"), oom_advice="use a shorter --length") == 2
    assert capsys.readouterr().err == ("demo.py: error: out of memory (Unable to allocate 8 EiB); "
                                       "use a shorter --length\n")
    assert entry.run(fails, KeyboardInterrupt()) == 130
    assert capsys.readouterr().err == "demo.py: interrupted\n"
    with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback
        entry.run(fails, ZeroDivisionError("bug"))
    with pytest.raises(TypeError):  # a TypeError from a bug is not bad input
        entry.run(fails, TypeError("bug"))
    monkeypatch.setenv("NPYRNN_DEBUG", "1")
    with pytest.raises(DataError):
        entry.run(fails, DataError("shown with its traceback under NPYRNN_DEBUG"))


@settings(max_examples=200, derandomize=True, deadline=None)
@given(text=st.one_of(st.text(max_size=12), st.integers(-10**20, 10**20).map(str),
                      st.floats(allow_nan=True, allow_infinity=True).map(repr)))
def test_flag_types_accept_exactly_their_range(entry, text):
    import argparse

    for convert, kind, ok in [
        (entry.positive_int, int, lambda v: v >= 1),
        (entry.nonnegative_int, int, lambda v: v >= 0),
        (entry.positive_float, float, lambda v: 0 < v < float("inf")),
        (entry.nonnegative_float, float, lambda v: 0 <= v < float("inf")),
        (entry.probability, float, lambda v: 0 < v <= 1),
    ]:
        try:
            expected = kind(text)
        except ValueError:
            expected = None
        if expected is not None and ok(expected):
            assert convert(text) == expected
        else:
            with pytest.raises(argparse.ArgumentTypeError, match=re.escape(f"is not {convert.__name__}")):
                convert(text)
