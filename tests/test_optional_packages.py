"""Importing npyrnn and training on a local corpus need none of the optional packages.

A GPU machine with no package index may lack pooch, platformdirs, requests, tqdm, matplotlib,
hypothesis, numba (the fast extra), threadpoolctl or safetensors. Each case runs in a child process in which those modules cannot be
imported (``sys.modules[name] = None``), on the backend this session runs on (NPYRNN_BACKEND).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OPTIONAL = ("pooch", "platformdirs", "requests", "tqdm", "matplotlib", "hypothesis", "numba", "threadpoolctl")
TEXT = "the time traveller for so it will be convenient to speak of him was expounding a recondite matter to us " * 8


def run_without(modules, code, cwd):
    prelude = f"import sys\nfor _n in {tuple(modules)!r}:\n    sys.modules[_n] = None  # importing it fails\n"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-c", prelude + code], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env=env)


def test_import_and_cli_training_without_the_optional_packages(tmp_path):
    (tmp_path / "corpus.txt").write_text(TEXT)
    code = (
        "import npyrnn, npyrnn.train, npyrnn.generate, npyrnn.cli\n"
        "from npyrnn.cli import main\n"
        "sys.exit(main(['train', '--corpus', 'corpus.txt', '--hidden', '8', '--epochs', '2', '--batch-size', '2',"
        " '--num-steps', '5', '--val-tokens', '0', '--out', 'run']))\n"
    )
    result = run_without(OPTIONAL, code, tmp_path)
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(tmp_path / "run")) == sorted(
        ["model.safetensors", "checkpoint.safetensors", "metrics.csv", "summary.json"])
    assert "perplexity.png not written: matplotlib is not installed" in result.stderr
    assert "wrote model.safetensors, metrics.csv, summary.json to run" in result.stdout
    assert "Traceback" not in result.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["blas_threads"] is None  # threadpoolctl is missing: unknown, not an error
    if summary["backend"] == "numpy" and os.environ.get("NPYRNN_FUSED", "") != "0":
        assert summary["fused_kernels"] == "unavailable (on NumPy they need Numba: pip install 'npyrnn[fast]')"


def test_threads_without_threadpoolctl_is_one_clear_line(tmp_path):
    (tmp_path / "corpus.txt").write_text(TEXT)
    code = ("from npyrnn.cli import main\n"
            "sys.exit(main(['train', '--corpus', 'corpus.txt', '--hidden', '8', '--epochs', '1', '--batch-size', '2',"
            " '--num-steps', '5', '--val-tokens', '0', '--threads', '1', '--out', 'run']))\n")
    result = run_without(("threadpoolctl",), code, tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        "npyrnn: error: setting the thread count needs threadpoolctl: pip install threadpoolctl"]
    assert not (tmp_path / "run").exists()


def test_without_safetensors_python_training_works_and_the_cli_says_what_to_install(tmp_path):
    (tmp_path / "corpus.txt").write_text(TEXT)
    code = (
        "import numpy as np\n"
        "from npyrnn.data import SeqDataLoader, load_corpus\nfrom npyrnn.models import RNNLM\n"
        "from npyrnn.train import predict, train\n"
        "corpus, vocab = load_corpus('corpus.txt')\n"
        "loader = SeqDataLoader(corpus, 2, 5, rng=np.random.default_rng(0))\n"
        "model = RNNLM(len(vocab), 8, seed=0)\n"
        "history = train(model, loader, vocab, lr=1.0, num_epochs=2, progress=False)\n"
        "print(len(history), len(predict('the', 5, model, vocab)))\n"
    )
    result = run_without(("safetensors", *OPTIONAL), code, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["2", "8"]

    code = ("from npyrnn.cli import main\n"
            "sys.exit(main(['train', '--corpus', 'corpus.txt', '--hidden', '8', '--epochs', '1', '--out', 'run']))\n")
    result = run_without(("safetensors",), code, tmp_path)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "safetensors is not installed; pip install safetensors" in result.stderr
    assert not (tmp_path / "run").exists()
