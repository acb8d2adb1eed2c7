"""The command line: `npyrnn train | generate | gradcheck`, end to end, and every kind of bad input.

Most runs call ``npyrnn.cli.main`` in-process; a few run ``python -m npyrnn`` and the
``npyrnn`` console script as subprocesses to see the real exit code and stderr.
"""

import argparse
import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from npyrnn import backend

# `npyrnn train` writes safetensors files and perplexity.png, and these tests check every file
for _name in ("safetensors", "matplotlib"):
    pytest.importorskip(_name, reason=f"{_name} is not installed: the CLI tests check the files it writes "
                        f"(pip install {_name})")
from npyrnn.checkpoint import load_checkpoint
from npyrnn.cli import main
from npyrnn.runs import OUTPUT_FILES, RUN_FILES
from npyrnn.train import predict

TEXT = "the quick brown fox jumps over the lazy dog\n" * 12  # 528 characters, every letter: vocabulary 28
SMALL = ["--hidden", "16", "--batch-size", "4", "--num-steps", "8", "--seed", "0", "--max-tokens", "400", "--val-tokens", "100"]
# the backend the CLI runs on here: NPYRNN_BACKEND's (numpy by default), in this process and in its children
LAST_LINE = re.compile(r"perplexity (\d+\.\d), (\d+\.\d) tokens/s on " + re.escape(backend.name))
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TIMEMACHINE = Path(os.environ.get("NPYRNN_DATA_DIR", "/nonexistent")) / "timemachine.txt"


def run(argv, capsys):
    """``npyrnn ARGV`` in-process: (exit code, stdout, stderr)."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse: usage errors and --help
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def run_subprocess(args, cwd, env_changes=None, executable=None):
    env = dict(os.environ)
    env.pop("NPYRNN_DEBUG", None)
    # NPYRNN_BACKEND is inherited: the children run on the backend this test session runs on
    if env.get("NPYRNN_DATA_DIR"):  # absolute, as the child runs in another folder
        env["NPYRNN_DATA_DIR"] = str(Path(env["NPYRNN_DATA_DIR"]).resolve())
    env.update(env_changes or {})
    cmd = [executable] if executable else [sys.executable, "-m", "npyrnn"]
    return subprocess.run(cmd + [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)


def tree(root):
    return sorted(str(p.relative_to(root)) for p in Path(root).rglob("*"))


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One small trained run shared by the generate tests: its checkpoint path."""
    root = tmp_path_factory.mktemp("trained")
    corpus = root / "corpus.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    code = main(["train", "--corpus", str(corpus), *SMALL, "--epochs", "8", "--quiet", "--out", str(root / "run")])
    assert code == 0
    return root / "run" / "model.safetensors"


# --------------------------------------------------------------------------- train


def test_train_writes_the_four_files(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    code, stdout, stderr = run(["train", "--corpus", corpus, *SMALL, "--epochs", "3", "--lr", "0.5", "--out", out],
                               capsys)

    assert code == 0, stderr
    assert stderr == ""
    assert sorted(os.listdir(out)) == sorted(RUN_FILES)  # exactly these: no temporary files left
    lines = stdout.splitlines()
    assert f"wrote {', '.join(OUTPUT_FILES)} to {out}" in lines
    last = LAST_LINE.fullmatch(lines[-1])
    assert last, lines[-1]

    rows = list(csv.reader((out / "metrics.csv").read_text().splitlines()))
    assert rows[0] == ["epoch", "perplexity", "val_perplexity", "tokens_per_s", "lr"]
    assert all(float(r[4]) == 0.5 for r in rows[1:])
    assert [int(r[0]) for r in rows[1:]] == [1, 2, 3]
    assert all(1 < float(r[1]) < 100 and 1 < float(r[2]) < 100 and float(r[3]) > 0 for r in rows[1:])

    assert (out / "perplexity.png").read_bytes().startswith(PNG_SIGNATURE)

    summary = json.loads((out / "summary.json").read_text())
    assert {"perplexity", "tokens_per_s", "epochs", "seconds", "backend"} <= set(summary)
    assert summary["backend"] == backend.name
    assert summary["epochs"] == 3
    assert summary["seconds"] > 0
    assert summary["perplexity"] == pytest.approx(float(rows[-1][1]))
    assert summary["val_perplexity"] == pytest.approx(float(rows[-1][2]))
    assert summary["tokens_per_s_last_epoch"] == pytest.approx(float(rows[-1][3]))
    assert 0 < summary["tokens_per_s"] <= summary["tokens_per_s_last_epoch"] * 3  # the whole run, slower ends included
    best = min(range(3), key=lambda i: float(rows[1 + i][2]))
    assert (summary["best_epoch"], summary["best_val_perplexity"]) == (best + 1, pytest.approx(float(rows[1 + best][2])))
    assert f"{summary['perplexity']:.1f}" == last.group(1)
    assert f"{summary['tokens_per_s_last_epoch']:.1f}" == last.group(2)
    settings = {"hidden": 16, "batch_size": 4, "num_steps": 8, "seed": 0, "lr": 0.5, "layers": 1,
                "nonlinearity": "tanh", "dtype": "float32", "random_iter": False, "corpus": str(corpus),
                "vocab_size": 28, "num_tokens": 400, "val_tokens": 100}
    assert {k: summary[k] for k in settings} == settings

    model, vocab, extra = load_checkpoint(out / "model.safetensors")
    assert model.config["num_hiddens"] == 16 and model.config["vocab_size"] == 28
    assert extra["lr"] == 0.5 and extra["token"] == "char"
    assert len(vocab) == 28


def test_train_quiet_prints_only_the_last_line(tmp_path, capsys):
    out = tmp_path / "tm"
    code, stdout, stderr = run(["train", "--corpus", "timemachine", "--max-tokens", "2000", "--hidden", "8",
                                "--epochs", "2", "--batch-size", "4", "--num-steps", "10", "--random-iter",
                                "--layers", "2", "--dtype", "float64", "--quiet", "--out", out], capsys)
    assert code == 0, stderr
    assert stderr == ""
    assert len(stdout.splitlines()) == 1
    assert LAST_LINE.fullmatch(stdout.rstrip("\n"))
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["num_tokens"], summary["random_iter"], summary["layers"], summary["dtype"]) == (
        2000, True, 2, "float64")
    assert len((out / "metrics.csv").read_text().splitlines()) == 1 + 2
    assert load_checkpoint(out / "model.safetensors")[0].dtype == "float64"


def test_train_default_out_is_under_runs(tmp_path, corpus, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, stdout, stderr = run(["train", "--corpus", "corpus.txt", *SMALL, "--epochs", "1", "--quiet"], capsys)
    assert code == 0, stderr
    assert sorted(os.listdir(tmp_path / "runs" / "corpus-h16-sequential")) == sorted(RUN_FILES)


def test_training_learns_a_repeated_text(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    code, _, stderr = run(["train", "--corpus", corpus, "--hidden", "32", "--batch-size", "4", "--num-steps", "8",
                           "--epochs", "10", "--val-tokens", "0", "--quiet", "--out", out], capsys)
    assert code == 0, stderr
    ppl = [float(r["perplexity"]) for r in csv.DictReader((out / "metrics.csv").open())]
    vocab_size = 28
    assert ppl[0] > vocab_size / 2  # starts near uniform guessing
    assert ppl[-1] < vocab_size / 8, ppl  # ends far below it: the model has learned the sentence
    assert ppl[-1] < ppl[0] / 5


# --------------------------------------------------------------------------- generate


def test_generate_greedy_prints_prefix_and_length_chars_deterministically(trained, capsys):
    args = ["generate", "--checkpoint", trained, "--prefix", "the lazy", "--length", "20"]
    code, stdout, stderr = run(args, capsys)
    assert code == 0, stderr
    assert stderr == ""
    assert stdout.endswith("\n") and stdout.count("\n") == 1
    text = stdout[:-1]
    assert text.startswith("the lazy")
    assert len(text) == len("the lazy") + 20

    assert run(args, capsys)[1] == stdout  # greedy: the same every time
    model, vocab, _ = load_checkpoint(trained)
    assert text == predict("the lazy", 20, model, vocab)  # and what the Python API gives
    assert set(text[len("the lazy"):]) <= set(vocab.idx_to_token)


def test_generate_sampling_is_reproducible_from_its_seed(trained, capsys):
    args = ["generate", "--checkpoint", trained, "--prefix", "the", "--length", "40",
            "--temperature", "1", "--top-k", "3"]
    code, first, stderr = run([*args, "--seed", "5"], capsys)
    assert code == 0, stderr
    assert run([*args, "--seed", "5"], capsys)[1] == first
    model, vocab, _ = load_checkpoint(trained)
    assert first[:-1] == predict("the", 40, model, vocab, temperature=1.0, top_k=3, seed=5)
    assert len(first[:-1]) == 3 + 40


def test_generate_length_zero_prints_the_prefix(trained, capsys):
    assert run(["generate", "--checkpoint", trained, "--prefix", "fox", "--length", "0"], capsys)[:2] == (0, "fox\n")


def test_generate_cleans_the_prefix_as_the_training_text_was(trained, capsys):
    code, stdout, stderr = run(["generate", "--checkpoint", trained, "--prefix", "Thé X", "--length", "5"], capsys)
    assert code == 0 and stderr == ""
    assert stdout.startswith("th x") and len(stdout[:-1]) == len("th x") + 5


def test_generate_unknown_prefix_characters_warn_once(tmp_path, corpus, capsys):
    out = tmp_path / "raw"
    assert main(["train", "--corpus", str(corpus), *SMALL, "--raw", "--epochs", "1", "--quiet", "--out", str(out)]) == 0
    capsys.readouterr()
    args = ["generate", "--checkpoint", out / "model.safetensors", "--prefix", "Thé X", "--length", "5"]
    code, stdout, stderr = run(args, capsys)
    assert code == 0
    assert len(stderr.splitlines()) == 1
    assert stderr.startswith("npyrnn: warning:")
    for ch in ("'T'", "'X'", "'é'"):
        assert ch in stderr
    assert stdout.startswith("Thé X") and len(stdout[:-1]) == len("Thé X") + 5


def test_generate_top_p_num_samples_and_stop(trained, capsys):
    model, vocab, _ = load_checkpoint(trained)
    args = ["generate", "--checkpoint", trained, "--prefix", "the", "--length", "40", "--temperature", "1.2",
            "--top-p", "0.9", "--top-k", "8", "--seed", "3"]
    code, stdout, stderr = run([*args, "--num-samples", "3"], capsys)
    assert code == 0 and stderr == "", stderr
    kw = dict(temperature=1.2, top_p=0.9, top_k=8)
    texts = predict("the", 40, model, vocab, seed=3, num_samples=3, **kw)
    assert texts == [predict("the", 40, model, vocab, seed=3 + i, **kw) for i in range(3)]
    assert stdout == "".join(f"--- sample {i + 1} ---\n{t}\n" for i, t in enumerate(texts))
    assert run([*args, "--num-samples", "3", "--no-stream"], capsys)[1] == stdout
    assert run([*args, "--num-samples", "1"], capsys)[1] == texts[0] + "\n"  # one sample: no header

    stop = texts[0][3:][10:12]
    expected = "the" + texts[0][3:][: texts[0][3:].index(stop) + 2]
    for flags in ([], ["--no-stream"]):
        assert run([*args, "--stop", stop, *flags], capsys)[1] == expected + "\n", flags
    greedy = predict("the", 40, model, vocab)
    code, stdout, _ = run(["generate", "--checkpoint", trained, "--prefix", "the", "--length", "40", "--stop",
                           greedy[3 + 5 : 3 + 7]], capsys)
    assert code == 0 and stdout.startswith("the") and stdout.endswith(greedy[3 + 5 : 3 + 7] + "\n")
    assert greedy.startswith(stdout[:-1])


def test_generate_streams_its_output(trained, monkeypatch):
    """Each piece is written and flushed as it is produced, not the whole text at the end."""
    events = []

    class Recorder:
        def write(self, text):
            events.append(("write", text))

        def flush(self):
            events.append(("flush", None))

    monkeypatch.setattr(sys, "stdout", Recorder())
    assert main(["generate", "--checkpoint", str(trained), "--prefix", "the", "--length", "12"]) == 0
    writes = [text for kind, text in events if kind == "write"]
    assert len(writes) == 1 + 12 + 1  # the prefix, one piece per token, the newline
    assert writes[0] == "the" and all(len(w) == 1 for w in writes[1:])
    assert events[:4] == [("write", "the"), ("flush", None), ("write", writes[1]), ("flush", None)]
    model, vocab, _ = load_checkpoint(trained)
    assert "".join(writes) == predict("the", 12, model, vocab) + "\n"


# --------------------------------------------------------------------------- CLI manners


def test_version(capsys):
    import npyrnn

    assert run(["--version"], capsys)[:2] == (0, f"npyrnn {npyrnn.__version__}\n")
    assert re.fullmatch(r"\d+\.\d+\.\d+", npyrnn.__version__)


def _action_help(parser, action):
    """The help entry of one flag, whitespace collapsed."""
    formatter = parser._get_formatter()
    return " ".join(formatter._format_action(action).split())


@pytest.mark.parametrize("command", ["train", "generate", "gradcheck", "info"])
def test_help_shows_every_default(command, capsys):
    from npyrnn.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    shown = 0
    for action in sub._actions:
        if not action.option_strings or action.default is argparse.SUPPRESS:
            continue
        text = _action_help(sub, action)
        assert "default None" not in text and "default False" not in text, text  # no noise for switches
        if action.default is None or action.default is False:
            continue
        convert = action.type or type(action.default)
        values = re.findall(r"default:? '?([^'()]*?)'?(?:\)|$)", text)
        assert any(_same(convert, v, action.default) for v in values), f"{action.option_strings[0]}: {text!r}"
        shown += 1
    assert shown or command == "info"
    code, stdout, _ = run([command, "--help"], capsys)  # and the real --help prints them
    assert code == 0 and "default" in stdout or command == "info"


def _same(convert, text, default):
    try:
        return convert(text) == default
    except (ValueError, TypeError, argparse.ArgumentTypeError):
        return False


def test_info_text_and_json(trained, capsys):
    code, stdout, stderr = run(["info", trained], capsys)
    assert code == 0 and stderr == "", stderr
    summary = json.loads((trained.parent / "summary.json").read_text())
    fields = dict(re.match(r"(\w+)\s+(.*)", line).groups() for line in stdout.splitlines()[:7])
    assert fields["checkpoint"] == str(trained)
    assert fields["cell"] == "rnn (tanh)"
    assert fields["vocabulary"].startswith("28 char tokens: '<unk>', ' ', ")
    assert (fields["hidden"], fields["layers"], fields["directions"]) == ("16", "1", "1")
    V, H = 28, 16
    num_params = H * V + H * H + 2 * H + V * H + V
    assert fields["parameters"] == f"{num_params:,} (float32)"
    assert "training settings:" in stdout and re.search(r"^  lr +1\.0$", stdout, re.MULTILINE)
    assert f"final metrics (from {trained.parent / 'summary.json'}):" in stdout
    assert re.search(rf"^  perplexity +{summary['perplexity']:.4g}$", stdout, re.MULTILINE)

    code, stdout, stderr = run(["info", trained, "--json"], capsys)
    assert code == 0 and stderr == ""
    info = json.loads(stdout)
    assert (info["cell"], info["vocab_size"], info["hidden"], info["layers"], info["directions"]) == (
        "rnn", 28, 16, 1, 1)
    assert info["parameters"] == num_params
    model, vocab, extra = load_checkpoint(trained)
    assert info["parameters"] == sum(v.size for v in model.params.values())
    assert info["vocabulary"] == vocab.idx_to_token[:28] and info["token"] == "char"
    assert info["settings"] == extra
    assert info["metrics"]["perplexity"] == summary["perplexity"]
    assert info["metrics"]["tokens_per_s"] == summary["tokens_per_s"]
    assert info["summary"] == str(trained.parent / "summary.json")


def test_info_without_or_with_a_bad_summary(trained, tmp_path, capsys):
    lone = tmp_path / "lone" / "model.safetensors"
    lone.parent.mkdir()
    shutil.copy(trained, lone)
    code, stdout, stderr = run(["info", lone, "--json"], capsys)
    assert code == 0 and stderr == ""
    assert json.loads(stdout)["metrics"] == {} and json.loads(stdout)["summary"] is None
    assert "final metrics: none recorded" in run(["info", lone], capsys)[1]
    (lone.parent / "summary.json").write_text("{not json")
    code, stdout, stderr = run(["info", lone], capsys)
    assert code == 0 and "final metrics: none recorded" in stdout
    assert len(stderr.splitlines()) == 1 and stderr.startswith("npyrnn: warning:") and "summary.json" in stderr


INFO_BAD = {
    "missing": ("missing.safetensors", "no such file"),
    "directory": ("folder", "directory"),
    "garbage": ("garbage.safetensors", "not a readable safetensors file"),
    "text": ("good.txt", "not a readable safetensors file"),
}


@pytest.mark.parametrize("name, words", INFO_BAD.values(), ids=INFO_BAD.keys())
def test_info_bad_input(bad_files, monkeypatch, capsys, name, words):
    monkeypatch.chdir(bad_files)
    for flags in ([], ["--json"]):
        assert_clean_failure(*run(["info", name, *flags], capsys), words)
    assert_clean_failure(*run(["info"], capsys), "checkpoint")


# --------------------------------------------------------------------------- gradcheck


@pytest.mark.parametrize(
    "flags, num_params",
    [
        (["--nonlinearity", "tanh"], 6),
        (["--nonlinearity", "relu"], 6),
        (["--layers", "2", "--bidirectional"], 4 * 4 + 2),
        (["--layers", "2", "--bidirectional", "--nonlinearity", "relu"], 4 * 4 + 2),
    ],
    ids=["tanh", "relu", "2-layer-bidirectional", "2-layer-bidirectional-relu"],
)
def test_gradcheck_is_tight(corpus, capsys, flags, num_params):
    code, stdout, stderr = run(["gradcheck", "--corpus", corpus, "--hidden", "6", "--batch-size", "2",
                                "--num-steps", "5", *flags], capsys)
    assert code == 0, stderr
    lines = stdout.splitlines()
    assert len(lines) == num_params + 1  # one line per parameter, then the verdict
    worst = re.fullmatch(r"largest relative error (\S+) \((\S+)\) on " + re.escape(backend.name)
                         + r": ok \(tolerance 1e-06\)", lines[-1])
    assert worst, lines[-1]
    assert float(worst.group(1)) < 1e-6
    assert all(float(line.split()[1]) <= float(worst.group(1)) for line in lines[:-1])


def test_gradcheck_on_timemachine_fails_above_tol(capsys):
    base = ["gradcheck", "--corpus", "timemachine", "--max-tokens", "2000", "--hidden", "5", "--batch-size", "2",
            "--num-steps", "4"]
    assert run(base, capsys)[0] == 0
    code, stdout, _ = run([*base, "--tol", "1e-300"], capsys)  # no finite difference is that exact
    assert code == 1
    assert "FAILED" in stdout.splitlines()[-1]


# --------------------------------------------------------------------------- bad input


@pytest.fixture
def bad_files(tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "short.txt").write_text("the quick brown fox\n", encoding="utf-8")
    (tmp_path / "latin1.txt").write_bytes("café au lait, crème brûlée\n".encode("latin-1") * 20)
    (tmp_path / "good.txt").write_text(TEXT, encoding="utf-8")
    (tmp_path / "a_file").write_text("not a directory\n")
    (tmp_path / "folder").mkdir()
    (tmp_path / "runfolder" / "summary.json").mkdir(parents=True)
    (tmp_path / "garbage.safetensors").write_bytes(bytes(range(256)) * 8)
    return tmp_path


GOOD = ["--corpus", "good.txt", *SMALL, "--epochs", "1", "--out", "out"]

TRAIN_BAD = {
    "missing-corpus": (["--corpus", "missing.txt"], "not found"),
    "directory-corpus": (["--corpus", "folder"], "is a directory"),
    "empty-corpus": (["--corpus", "empty.txt"], "no tokens"),
    "too-short": (["--corpus", "short.txt"], "needs at least"),
    "max-tokens-too-short": (["--max-tokens", "20"], "needs at least"),
    "not-utf8": (["--corpus", "latin1.txt"], "not UTF-8"),
    "hidden-0": (["--hidden", "0"], "--hidden"),
    "layers-0": (["--layers", "0"], "--layers"),
    "epochs-negative": (["--epochs", "-1"], "--epochs"),
    "lr-0": (["--lr", "0"], "--lr"),
    "lr-abc": (["--lr", "abc"], "'abc'"),
    "lr-nan": (["--lr", "nan"], "--lr"),
    "batch-size-0": (["--batch-size", "0"], "--batch-size"),
    "num-steps-0": (["--num-steps", "0"], "--num-steps"),
    "clip-negative": (["--clip", "-1"], "--clip"),
    "nonlinearity": (["--nonlinearity", "sigmoid"], "sigmoid"),
    "dtype": (["--dtype", "float16"], "float16"),
    "unknown-flag": (["--colour", "red"], "--colour"),
    "out-is-a-file": (["--out", "a_file"], "is a file"),
    "out-under-a-file": (["--out", "a_file/run"], "is a file"),
    "empty-prefix": (["--prefix", ""], "prefix is empty"),
    "blank-prefix-words": (["--token", "word", "--prefix", "   "], "no words"),
    "output-name-is-a-folder": (["--out", "runfolder"], "is not a file"),
}


@pytest.mark.parametrize("change, words", TRAIN_BAD.values(), ids=TRAIN_BAD.keys())
def test_train_bad_input(bad_files, monkeypatch, capsys, change, words):
    monkeypatch.chdir(bad_files)
    before = tree(bad_files)
    # later flags win in argparse, so GOOD + change is the good command with one thing wrong
    code, stdout, stderr = run(["train", *GOOD, *change], capsys)
    assert_clean_failure(code, stdout, stderr, words)
    assert tree(bad_files) == before  # nothing created: no out/, no runs/, no temporary file


@pytest.mark.parametrize("variable", ["NPYRNN_SPLIT_PRODUCTS", "NPYRNN_FUSED"])
def test_train_bad_switch_variable(bad_files, monkeypatch, capsys, variable):
    monkeypatch.chdir(bad_files)
    monkeypatch.setenv(variable, "maybe")
    before = tree(bad_files)
    code, stdout, stderr = run(["train", *GOOD], capsys)
    assert_clean_failure(code, stdout, stderr, f"{variable} must be 0")
    assert tree(bad_files) == before


GENERATE_BAD = {
    "temperature-negative": (["--temperature", "-1"], "--temperature"),
    "top-k-0": (["--top-k", "0"], "--top-k"),
    "top-k-without-temperature": (["--top-k", "3"], "top_k applies only when sampling"),
    "top-p-0": (["--temperature", "1", "--top-p", "0"], "--top-p"),
    "top-p-above-1": (["--temperature", "1", "--top-p", "1.5"], "(0, 1]"),
    "top-p-abc": (["--temperature", "1", "--top-p", "abc"], "'abc'"),
    "top-p-nan": (["--temperature", "1", "--top-p", "nan"], "--top-p"),
    "top-p-without-temperature": (["--top-p", "0.9"], "top_p applies only when sampling"),
    "num-samples-0": (["--temperature", "1", "--num-samples", "0"], "--num-samples"),
    "num-samples-greedy": (["--num-samples", "2"], "several samples need sampling"),
    "empty-stop": (["--stop", ""], "stop string must be a non-empty string"),
    "empty-stop-no-stream": (["--stop", "", "--no-stream"], "stop string must be a non-empty string"),
    "length-negative": (["--length", "-5"], "--length"),
    "empty-prefix": (["--prefix", ""], "prefix is empty"),
    "missing-checkpoint": (["--checkpoint", "missing.safetensors"], "no such file"),
    "directory-checkpoint": (["--checkpoint", "folder"], "directory"),
    "garbage-checkpoint": (["--checkpoint", "garbage.safetensors"], "not a readable safetensors file"),
    "truncated-checkpoint": (["--checkpoint", "truncated.safetensors"], "truncated"),
    "text-as-checkpoint": (["--checkpoint", "good.txt"], "not a readable safetensors file"),
}


@pytest.mark.parametrize("change, words", GENERATE_BAD.values(), ids=GENERATE_BAD.keys())
def test_generate_bad_input(bad_files, trained, monkeypatch, capsys, change, words):
    data = trained.read_bytes()
    (bad_files / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    monkeypatch.chdir(bad_files)
    before = tree(bad_files)
    code, stdout, stderr = run(["generate", "--checkpoint", trained, "--length", "5", *change], capsys)
    assert_clean_failure(code, stdout, stderr, words)
    assert tree(bad_files) == before


def test_missing_subcommand(capsys):
    assert_clean_failure(*run([], capsys), "command")


def test_unknown_subcommand(capsys):
    assert_clean_failure(*run(["fit"], capsys), "fit")


def test_missing_checkpoint_flag(capsys):
    assert_clean_failure(*run(["generate", "--prefix", "the"], capsys), "--checkpoint")


def test_out_of_memory_is_one_line(bad_files, monkeypatch, capsys):
    import npyrnn.models

    def huge(*args, **kwargs):
        raise MemoryError("Unable to allocate 7.28 TiB for an array with shape (1000000, 1000000)")

    monkeypatch.setattr(npyrnn.models.RNNLM, "__init__", huge)
    monkeypatch.chdir(bad_files)
    before = tree(bad_files)
    assert_clean_failure(*run(["train", *GOOD], capsys), "out of memory", "--hidden")
    assert tree(bad_files) == before


def assert_clean_failure(code, stdout, stderr, *words):
    assert code == 2, (code, stderr)
    assert stdout == ""
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("npyrnn"), lines[0]
    assert "error" in lines[0]
    assert "Traceback" not in stderr
    for word in words:
        assert word in lines[0], f"{word!r} not in {lines[0]!r}"


# --------------------------------------------------------------------------- real processes


def test_python_m_npyrnn_help(tmp_path):
    result = run_subprocess(["--help"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: npyrnn")
    for command in ("train", "generate", "gradcheck"):
        assert command in result.stdout
    result = run_subprocess(["train", "--help"], tmp_path)
    assert result.returncode == 0
    for flag in ("--corpus", "--max-tokens", "--hidden", "--layers", "--bidirectional", "--nonlinearity", "--epochs",
                 "--lr", "--batch-size", "--num-steps", "--random-iter", "--clip", "--seed", "--dtype", "--out"):
        assert flag in result.stdout, flag


def test_subprocess_bad_input_exit_code_and_stderr(tmp_path, corpus):
    before = tree(tmp_path)
    result = run_subprocess(["train", "--corpus", corpus, "--hidden", "0", "--out", "out"], tmp_path)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("npyrnn train: error: argument --hidden")

    result = run_subprocess(["train", "--corpus", "missing.txt", "--out", "out"], tmp_path)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("npyrnn: error: corpus file")
    assert tree(tmp_path) == before


def test_subprocess_train_and_generate(tmp_path, corpus):
    result = run_subprocess(["train", "--corpus", corpus, *SMALL, "--epochs", "2", "--quiet", "--out", "run"],
                            tmp_path)
    assert result.returncode == 0, result.stderr
    assert LAST_LINE.fullmatch(result.stdout.rstrip("\n"))
    assert sorted(os.listdir(tmp_path / "run")) == sorted(RUN_FILES)
    result = run_subprocess(["generate", "--checkpoint", "run/model.safetensors", "--prefix", "the", "--length", "7"],
                            tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("the") and len(result.stdout) == 3 + 7 + 1


def test_a_reader_that_goes_away_ends_the_command_quietly(trained, tmp_path):
    """`npyrnn generate ... | head -1`: the closed pipe is not reported as an error (exit 141, as a shell
    reports SIGPIPE), and nothing is printed on stderr. (200,000 characters: the command is still
    writing when the reader goes away.)"""
    env = dict(os.environ)
    env.pop("NPYRNN_DEBUG", None)
    if env.get("NPYRNN_DATA_DIR"):
        env["NPYRNN_DATA_DIR"] = str(Path(env["NPYRNN_DATA_DIR"]).resolve())
    args = ["generate", "--checkpoint", trained, "--prefix", "the", "--length", "200000"]
    child = subprocess.Popen([sys.executable, "-m", "npyrnn", *map(str, args)], cwd=tmp_path, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    child.stdout.read(3)  # the first bytes, then the reader goes away
    child.stdout.close()
    err = child.stderr.read().decode()
    assert child.wait(timeout=120) == 141 and err == "", err


def test_bogus_backend_env(tmp_path, corpus):
    before = tree(tmp_path)
    result = run_subprocess(["train", "--corpus", corpus, *SMALL, "--epochs", "1", "--out", "out"], tmp_path,
                            {"NPYRNN_BACKEND": "bogus"})
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("npyrnn: error: unknown backend 'bogus'")
    assert "NPYRNN_BACKEND=numpy" in result.stderr
    assert tree(tmp_path) == before


@pytest.mark.skipif(backend.is_cupy_available(), reason="cupy runs here")
@pytest.mark.parametrize("how", ["flag", "env"])
def test_cupy_where_it_cannot_run(tmp_path, corpus, how):
    before = tree(tmp_path)
    args = ["train", "--corpus", corpus, *SMALL, "--epochs", "1", "--out", "out"]
    if how == "flag":
        result = run_subprocess([*args, "--backend", "cupy"], tmp_path)
    else:
        result = run_subprocess(args, tmp_path, {"NPYRNN_BACKEND": "cupy"})
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("npyrnn: error: backend 'cupy' was requested")
    assert "pip install" in result.stderr and "NPYRNN_BACKEND=numpy" in result.stderr
    assert tree(tmp_path) == before


def test_console_script(tmp_path, trained):
    script = shutil.which("npyrnn", path=str(Path(sys.executable).parent))
    assert script is not None, "the npyrnn console script is not installed next to this python (pip install -e .)"
    result = run_subprocess(["--help"], tmp_path, executable=script)
    assert result.returncode == 0 and result.stdout.startswith("usage: npyrnn")
    result = run_subprocess(["generate", "--checkpoint", trained, "--prefix", "the", "--length", "10"], tmp_path,
                            executable=script)
    assert result.returncode == 0, result.stderr
    model, vocab, _ = load_checkpoint(trained)
    assert result.stdout == predict("the", 10, model, vocab) + "\n"
    result = run_subprocess(["generate", "--checkpoint", "nope.safetensors"], tmp_path, executable=script)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "no such file" in result.stderr


def test_empty_prefix_fails_before_training(bad_files, monkeypatch, capsys):
    import npyrnn.train

    def no_training(*args, **kwargs):
        raise AssertionError("trained although the prefix was empty")

    monkeypatch.setattr(npyrnn.train.Trainer, "run_epoch", no_training)
    monkeypatch.chdir(bad_files)
    code, stdout, stderr = run(["train", *GOOD, "--prefix", ""], capsys)
    assert_clean_failure(code, stdout, stderr, "prefix is empty")


def test_a_failed_end_write_leaves_the_previous_files(tmp_path, corpus, capsys, monkeypatch):
    """The end files are replaced all together or not at all."""
    import npyrnn.files

    out = tmp_path / "run"
    args = ["train", "--corpus", str(corpus), *SMALL, "--epochs", "1", "--quiet", "--out", str(out)]
    assert main(args) == 0
    before = {name: (out / name).read_bytes() for name in RUN_FILES}
    capsys.readouterr()
    real = npyrnn.files._write_synced

    def failing(path, data):
        if path.name == "perplexity.png":  # one of the files staged together at the end
            raise OSError(28, "No space left on device")
        real(path, data)

    monkeypatch.setattr(npyrnn.files, "_write_synced", failing)
    code = main(["train", "--resume", str(out), "--epochs", "2", "--quiet"])  # one epoch more
    err = capsys.readouterr().err
    assert code == 2 and "No space left on device" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in out.iterdir()) == sorted(RUN_FILES)  # no staging folder left
    for name in ("model.safetensors", "summary.json", "perplexity.png"):
        assert (out / name).read_bytes() == before[name], name


def test_a_failed_first_write_leaves_no_folder(tmp_path, corpus, capsys, monkeypatch):
    out = tmp_path / "new" / "run"

    def failing_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    code = main(["train", "--corpus", str(corpus), *SMALL, "--epochs", "1", "--quiet", "--out", str(out)])
    assert code == 2 and not out.exists()


@pytest.mark.parametrize("exc", [ValueError("operands could not be broadcast together"), KeyError("x"),
                                 TypeError("unsupported operand")])
def test_a_bug_inside_the_library_shows_its_traceback(bad_files, monkeypatch, capsys, exc):
    """Only npyrnn's own errors (and OSError, MemoryError) are bad input; a NumPy error is a bug."""
    import npyrnn.train

    def broken(*args, **kwargs):
        raise exc

    monkeypatch.setattr(npyrnn.train.Trainer, "run_epoch", broken)
    monkeypatch.chdir(bad_files)
    with pytest.raises(type(exc)):
        main([*["train"], *GOOD])


def test_every_bad_input_error_is_one_family():
    from npyrnn import errors

    for name in ("BackendError", "DataError", "CheckpointError", "UsageError"):
        assert issubclass(getattr(errors, name), errors.NpyrnnError), name
    import npyrnn.checkpoint
    import npyrnn.data

    assert npyrnn.data.DataError is errors.DataError and npyrnn.checkpoint.CheckpointError is errors.CheckpointError


@pytest.mark.parametrize("flags", [["--optimizer", "adam", "--lr", "0.01", "--schedule", "cosine"],
                                   ["--optimizer", "momentum", "--lr", "0.3", "--weight-decay", "0.001",
                                    "--schedule", "step:2:0.5"],
                                   ["--optimizer", "rmsprop", "--lr", "0.003", "--schedule", "warmup:2"],
                                   ["--optimizer", "adagrad", "--lr", "0.05", "--schedule", "decay:2:0.9"],
                                   ["--optimizer", "adamw", "--lr", "0.01", "--schedule", "exp:0.9"]],
                         ids=["adam-cosine", "momentum-step", "rmsprop-warmup", "adagrad-decay", "adamw-exp"])
def test_optimizers_and_schedules_resume_bit_exactly(tmp_path, corpus, capsys, monkeypatch, flags):
    """Optimiser buffers and the schedule are in the checkpoint: a run stopped by SIGINT in its third
    epoch and resumed equals the uninterrupted run, bit for bit."""
    import signal

    import npyrnn.train
    from safetensors.numpy import load_file

    base = ["train", "--corpus", str(corpus), *SMALL, *flags, "--epochs", "4", "--quiet"]
    assert main([*base, "--out", str(tmp_path / "whole")]) == 0
    real_step, calls = npyrnn.train._step, []

    def step_then_interrupt(*args):
        calls.append(1)
        if len(calls) == 2 * 12 + 3:  # 12 minibatches per epoch: stop inside epoch 3
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(*args)

    monkeypatch.setattr(npyrnn.train, "_step", step_then_interrupt)
    assert main([*base, "--out", str(tmp_path / "split")]) == 130
    monkeypatch.setattr(npyrnn.train, "_step", real_step)
    assert main(["train", "--resume", str(tmp_path / "split"), "--quiet"]) == 0
    whole, split = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("whole", "split"))
    assert whole.keys() == split.keys() and all(np.array_equal(whole[k], split[k]) for k in whole)
    rows = [r for r in csv.DictReader((tmp_path / "split" / "metrics.csv").open())]
    lrs = [float(r["lr"]) for r in rows]
    assert len(rows) == 4 and lrs == [float(r["lr"]) for r in csv.DictReader((tmp_path / "whole" / "metrics.csv").open())]
    summary = json.loads((tmp_path / "split" / "summary.json").read_text())
    assert summary["optimizer"] == flags[1] and summary["schedule"] == flags[flags.index("--schedule") + 1]


@pytest.mark.parametrize("spec", ["bogus", "step:0:0.5", "step:2", "exp:x", "cosine:1:2", "multistep:a:0.1",
                                  "warmup:0"])
def test_bad_schedule_is_one_line(tmp_path, corpus, capsys, spec):
    code, stdout, stderr = run(["train", "--corpus", corpus, *SMALL, "--epochs", "1", "--schedule", spec,
                                "--out", tmp_path / "run"], capsys)
    assert_clean_failure(code, stdout, stderr, "--schedule", "use one of")
    assert not (tmp_path / "run").exists()
