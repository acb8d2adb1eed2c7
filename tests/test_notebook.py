"""examples/the-time-machine.ipynb: committed without outputs, linked to every derivation, run headless.

The notebook reads its two costly sizes from `NPYRNN_NB_EPOCHS` and `NPYRNN_NB_HIDDEN` (the
book's 500 and 512 when unset); here it runs with 2 epochs and hidden 32 in a real Jupyter
kernel (nbclient, the `python3` kernel of this environment's ipykernel), and the test checks
the outputs a reader relies on: the gradient check, a perplexity plot redrawn in place, the
final perplexities, generated text, and the CuPy cell's answer.
"""

import json
import math
import os
import re
import sys
from pathlib import Path

import pytest

from npyrnn import backend

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "examples" / "the-time-machine.ipynb"
DERIVATIONS = ROOT / "docs" / "derivations"
SHORT = {"NPYRNN_NB_EPOCHS": "2", "NPYRNN_NB_HIDDEN": "32"}
CLEAR = f"jupyter nbconvert --clear-output --inplace {NOTEBOOK.relative_to(ROOT)}"


def raw_notebook():
    """The committed file as JSON, as git holds it (nothing normalised away)."""
    return json.loads(NOTEBOOK.read_text(encoding="utf-8"))


def dirty_cells(nb):
    """Indices of code cells that carry outputs or an execution count."""
    return [i for i, cell in enumerate(nb["cells"])
            if cell["cell_type"] == "code" and (cell.get("outputs") or cell.get("execution_count") is not None)]


def source(cell):
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def parameters_cell(nb):
    cells = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(cells) == 1, "the notebook needs exactly one code cell tagged 'parameters'"
    return source(cells[0])


# ------------------------------------------------------------------------------ the committed file


def test_committed_notebook_is_valid_and_has_no_outputs():
    import nbformat

    nb = raw_notebook()
    nbformat.validate(nbformat.from_dict(nb))
    assert nb["metadata"]["kernelspec"]["name"] == "python3"
    assert not dirty_cells(nb), f"cells {dirty_cells(nb)} carry outputs or execution counts; run `{CLEAR}`"


def test_dirty_cells_finds_outputs_and_execution_counts():
    clean = {"cell_type": "code", "source": "1", "outputs": [], "execution_count": None, "metadata": {}}
    with_output = dict(clean, outputs=[{"output_type": "stream", "name": "stdout", "text": "1\n"}])
    with_count = dict(clean, execution_count=3)
    markdown = {"cell_type": "markdown", "source": "x", "metadata": {}}
    assert dirty_cells({"cells": [clean, markdown, with_output, clean, with_count]}) == [2, 4]


def test_notebook_links_every_derivation_and_every_link_resolves():
    nb = raw_notebook()
    text = "\n".join(source(c) for c in nb["cells"] if c["cell_type"] == "markdown")
    links = [link for link in re.findall(r"\]\(([^)\s]+)\)", text) if not re.match(r"[a-z]+:", link)]
    broken = [link for link in links if not (NOTEBOOK.parent / link.split("#")[0]).is_file()]
    assert not broken, f"relative links that lead nowhere from examples/: {broken}"
    linked = {(NOTEBOOK.parent / link.split("#")[0]).resolve() for link in links}
    unlinked = sorted(p.name for p in DERIVATIONS.glob("*.md") if p.resolve() not in linked)
    assert not unlinked, f"derivations the notebook does not link: {unlinked}"


def test_parameters_are_the_books_settings_unless_the_environment_says_otherwise(monkeypatch):
    code = parameters_cell(raw_notebook())
    for name in SHORT:
        monkeypatch.delenv(name, raising=False)
    books = {}
    exec(code, books)
    assert (books["EPOCHS"], books["HIDDEN"], books["BATCH_SIZE"], books["NUM_STEPS"], books["LR"], books["CLIP"]) == (
        500, 512, 32, 35, 1.0, 1.0)
    assert (books["TRAIN_TOKENS"], books["VAL_TOKENS"]) == (10_000, 5_000)
    for name, value in SHORT.items():
        monkeypatch.setenv(name, value)
    short = {}
    exec(code, short)
    assert (short["EPOCHS"], short["HIDDEN"], short["CUPY_EPOCHS"], short["PLOT_EVERY"]) == (2, 32, 2, 1)


# ------------------------------------------------------------------------------ run headless


def _short_run(monkeypatch):
    """Execute the notebook with the short setting; return it and the kernel's message types per cell."""
    import nbformat
    from nbclient import NotebookClient

    for name, value in SHORT.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("NPYRNN_BACKEND", raising=False)  # the NumPy cells; the CuPy cell switches by itself
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend draws the figures
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    nb = nbformat.reads(NOTEBOOK.read_text(encoding="utf-8"), as_version=4)
    # one extra cell, in memory only: which Python the kernel runs
    nb.cells.append(nbformat.v4.new_code_cell("import sys; print('kernel prefix', sys.prefix)"))
    messages = {}

    class Recording(NotebookClient):
        def process_message(self, msg, cell, cell_index):
            messages.setdefault(cell_index, []).append(msg["msg_type"])
            return super().process_message(msg, cell, cell_index)

    client = Recording(nb, timeout=600, startup_timeout=120, kernel_name="python3",
                       resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute()  # raises CellExecutionError on the first cell that fails
    return nb, messages


def _streams(cell, name):
    return "".join(o["text"] for o in cell.get("outputs", []) if o["output_type"] == "stream" and o["name"] == name)


def _cell_printing(nb, text):
    found = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and text in _streams(c, "stdout")]
    assert len(found) == 1, f"expected one cell printing {text!r}, found {found}"
    return found[0]


# printed by tqdm.auto when npyrnn.train is imported in a kernel without ipywidgets
TQDM_WIDGET_WARNING = re.compile(r"^.*TqdmWarning: IProgress not found.*\n(?:\s+from .*\n)?", re.MULTILINE)


def test_notebook_runs_headless_on_a_short_setting(monkeypatch):
    nb, messages = _short_run(monkeypatch)
    code_cells = [c for c in nb.cells if c.cell_type == "code"]

    assert all(o["output_type"] != "error" for c in code_cells for o in c.outputs)
    stderr = TQDM_WIDGET_WARNING.sub("", "".join(_streams(c, "stderr") for c in code_cells))
    assert stderr == "", f"the notebook wrote to stderr: {stderr}"
    assert all(c.execution_count is not None for c in code_cells)

    # the kernel is this environment's Python
    assert _streams(code_cells[-1], "stdout") == f"kernel prefix {sys.prefix}\n"

    # corpus, minibatches, and the gradient check
    _cell_printing(nb, "170,580 characters, a vocabulary of 28: ['<unk>', ' ', 'e', 't'")
    _cell_printing(nb, "the book's loader: 8 minibatches of 32 x 35 per epoch")
    check = _streams(nb.cells[_cell_printing(nb, "against finite differences")], "stdout")
    error = float(re.search(r"largest relative error against finite differences: (\S+) \(", check).group(1))
    assert 0 <= error < 1e-6

    # training: one figure, redrawn in place, and the final perplexities
    index = _cell_printing(nb, "final perplexity: ")
    training = nb.cells[index]
    figures = [o for o in training.outputs if o["output_type"] == "display_data" and "image/png" in o["data"]]
    assert len(figures) == 1, "the perplexity plot should be one figure updated in place, not one per redraw"
    assert messages[index].count("display_data") == 1 and messages[index].count("update_display_data") >= 2
    final = re.search(r"final perplexity: training (\S+), validation (\S+) \(best (\S+) at epoch (\d+)\); "
                      r"([\d,]+) tokens/s on numpy", _streams(training, "stdout"))
    assert final, _streams(training, "stdout")
    train_ppl, val_ppl, best_ppl = (float(final.group(k)) for k in (1, 2, 3))
    for value in (train_ppl, val_ppl, best_ppl):  # 2 epochs of hidden 32: well below 28, the uniform guess
        assert math.isfinite(value) and 1 < value < 28
    assert best_ppl <= val_ppl and int(final.group(4)) in (1, 2)

    # generation: greedy, sampled, three nucleus samples, each 50 characters after the prefix
    generated = _streams(nb.cells[_cell_printing(nb, "greedy: ")], "stdout").splitlines()
    assert len(generated) == 5
    for line in generated:
        text = line.split(":", 1)[1].lstrip()
        assert text.startswith("time traveller") and len(text) == len("time traveller") + 50, line

    # the CuPy cell: reruns where a GPU is usable, says so where not
    if backend.is_cupy_available():
        assert re.search(r"cupy after 2 epochs: training perplexity \S+ \(numpy: \S+\)", _streams(
            nb.cells[_cell_printing(nb, "cupy after 2 epochs")], "stdout"))
    else:
        _cell_printing(nb, "CuPy is not available here")
