"""The documentation cannot drift from the code.

(a) every ```python block of docs/**/*.md and README.md runs, in order, one namespace per file;
(b) every `npyrnn ...` / `python -m npyrnn ...` line of a shell block parses with the real CLI parser;
(c) every flag of the CLI is documented in docs/reference/cli.md, under its subcommand;
(d) equation numbers cited in npyrnn/ comments and docstrings are \\tag{}-ed in docs/derivations/,
    and every tag is cited by the code;
(e) `mkdocs build --strict` succeeds.
"""

import argparse
import importlib.util
import io
import os
import re
import shlex
import subprocess
import sys
import tokenize
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

from npyrnn import backend
from npyrnn.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
DERIVATIONS = DOCS / "derivations"
MARKDOWN = sorted(DOCS.rglob("*.md")) + ([ROOT / "README.md"] if (ROOT / "README.md").exists() else [])
SHELL_LANGS = {"bash", "sh", "shell", "console", "shell-session"}

# Tags defined in docs/derivations/ that no code line cites, and why.
UNCITED_TAGS = {
    "2.11": "dh_0 = the carry after the first step; the code labels that line (4.6), its per-layer form",
}

# Which derivation holds each chapter of equation numbers.
CHAPTERS = {
    "1": "cross-entropy.md",
    "2": "bptt.md",
    "3": "truncated-bptt.md",
    "4": "stacked-bidirectional.md",
    "5": "one-hot.md",
    "6": "clipping-sgd.md",
    "7": "gradcheck.md",
    "8": "gru.md",
    "9": "lstm.md",
    "10": "dropout.md",
    "11": "optimizers.md",
}


def _rel(path):
    return str(path.relative_to(ROOT))


def code_blocks(path):
    """``[(language, first line number, source)]`` for every fenced block at the left margin."""
    blocks, lines = [], path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"^(`{3,}|~{3,})\s*([\w+-]*)", lines[i])
        if not m:
            i += 1
            continue
        fence, lang, start = m.group(1), m.group(2).lower(), i + 1
        i += 1
        while i < len(lines) and not lines[i].startswith(fence):
            i += 1
        blocks.append((lang, start + 1, "\n".join(lines[start:i]) + "\n"))
        i += 1
    return blocks


# ------------------------------------------------------------------------------------------ (a)


@pytest.mark.parametrize("path", [p for p in MARKDOWN if any(b[0] == "python" for b in code_blocks(p))], ids=_rel)
def test_python_blocks_run(path, tmp_path, monkeypatch):
    """Execute the file's python blocks in order, sharing one namespace, in an empty working directory."""
    data_dir = os.environ.get("NPYRNN_DATA_DIR")
    assert data_dir, "set NPYRNN_DATA_DIR (tests/conftest.py defaults it to ../shared/data)"
    monkeypatch.setenv("NPYRNN_DATA_DIR", str(Path(data_dir).resolve()))  # it may be relative to the repo
    monkeypatch.chdir(tmp_path)
    backend.set_backend("numpy")  # the examples build NumPy inputs; conftest restores the backend
    namespace = {"__name__": f"docs_{path.stem.replace('-', '_')}"}
    for lang, line, source in code_blocks(path):
        if lang != "python":
            continue
        # pad with newlines so that tracebacks show the markdown file's line numbers
        code = compile("\n" * (line - 1) + source, str(path), "exec")
        with redirect_stdout(io.StringIO()):
            exec(code, namespace)


# ------------------------------------------------------------------------------------------ (b)


def cli_commands(path):
    """``[(line, argv)]`` for each command line in the shell blocks that runs npyrnn."""
    found = []
    for lang, start, source in code_blocks(path):
        if lang not in SHELL_LANGS:
            continue
        logical, first = "", None
        for offset, raw in enumerate(source.splitlines()):
            text = raw.strip()
            if lang in ("console", "shell-session"):
                if not logical and not text.startswith("$ "):
                    continue  # output, not a command
                text = text.removeprefix("$ ")
            if first is None:
                first = start + offset
            if text.endswith("\\"):
                logical += text[:-1] + " "
                continue
            logical += text
            found.extend((first, argv) for argv in _npyrnn_argvs(logical))
            logical, first = "", None
    return found


def _npyrnn_argvs(command):
    words = shlex.split(command, comments=True)
    simple, current = [], []
    for w in words:
        if w in ("&&", "||", ";", "|"):
            simple.append(current)
            current = []
        else:
            current.append(w)
    simple.append(current)
    for words in simple:
        while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):
            words = words[1:]  # NPYRNN_DATA_DIR=... before the command
        if words and Path(words[0]).name == "npyrnn":
            yield words[1:]
        elif len(words) >= 3 and Path(words[0]).name.startswith("python") and words[1:3] == ["-m", "npyrnn"]:
            yield words[3:]


COMMANDS = [(path, line, argv) for path in MARKDOWN for line, argv in cli_commands(path)]


def test_docs_show_every_subcommand():
    shown = {argv[0] for _, _, argv in COMMANDS if argv}
    assert {"train", "generate", "gradcheck"} <= shown, f"subcommands shown in the docs: {sorted(shown)}"


@pytest.mark.parametrize("path,line,argv", COMMANDS, ids=[f"{_rel(p)}:{n}" for p, n, _ in COMMANDS])
def test_cli_lines_parse(path, line, argv):
    err = io.StringIO()
    try:
        with redirect_stderr(err), redirect_stdout(io.StringIO()):
            build_parser().parse_args(argv)
    except SystemExit as exc:
        assert exc.code == 0, f"{_rel(path)}:{line}: `npyrnn {shlex.join(argv)}` does not parse: {err.getvalue().strip()}"


# ------------------------------------------------------------------------------------------ (c)


def _subparsers(parser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices
    raise AssertionError("build_parser() has no subcommands")


def _cli_sections():
    """``{subcommand: text of its section}`` of docs/reference/cli.md (split at '## ' headings)."""
    text = (DOCS / "reference" / "cli.md").read_text(encoding="utf-8")
    sections = {}
    for part in re.split(r"^## ", text, flags=re.MULTILINE)[1:]:
        heading, _, body = part.partition("\n")
        m = re.fullmatch(r"npyrnn (\w+)\s*", heading)
        if m:
            sections[m.group(1)] = body
    return sections


SUBCOMMANDS = sorted(_subparsers(build_parser()))


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_flag_is_documented(command):
    sections = _cli_sections()
    assert command in sections, f"docs/reference/cli.md has no '## npyrnn {command}' section"
    sub = _subparsers(build_parser())[command]
    flags = [s for a in sub._actions for s in a.option_strings if s.startswith("--") and s != "--help"]
    missing = [f for f in flags if not re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", sections[command])]
    assert not missing, f"flags of `npyrnn {command}` missing from its section of docs/reference/cli.md: {missing}"


# ------------------------------------------------------------------------------------------ (d)

NUMBER = r"(?:1[0-9]|[1-9])\.[1-9]\d*[ab]?"  # chapters 1-19


def code_citations():
    """``{number: ['file:line', ...]}`` for every (n.m) in a comment or string under npyrnn/."""
    cited = {}
    for path in sorted((ROOT / "npyrnn").rglob("*.py")):
        with open(path, "rb") as f:
            tokens = [t for t in tokenize.tokenize(f.readline) if t.type in (tokenize.COMMENT, tokenize.STRING)]
        for tok in tokens:
            found = set()
            for group in re.findall(rf"\(({NUMBER}(?:\s*,\s*{NUMBER})*)\)", tok.string):
                found.update(n.strip() for n in group.split(","))
            for lo, hi in re.findall(rf"\(({NUMBER})\)\s*-\s*\(({NUMBER})\)", tok.string):  # (1.1)-(1.5)
                (c, a), (c2, b) = lo.split("."), hi.split(".")
                if c == c2 and a.isdigit() and b.isdigit():
                    found.update(f"{c}.{k}" for k in range(int(a), int(b) + 1))
            for n in found:
                cited.setdefault(n, []).append(f"{path.relative_to(ROOT)}:{tok.start[0]}")
    return cited


def doc_tags():
    """``{number: [file, ...]}`` for every \\tag{n.m} in docs/derivations/."""
    tags = {}
    for path in sorted(DERIVATIONS.glob("*.md")):
        for n in re.findall(r"\\tag\{([^}]*)\}", path.read_text(encoding="utf-8")):
            tags.setdefault(n.strip(), []).append(path.name)
    return tags


def test_every_cited_equation_is_derived():
    tags = doc_tags()
    missing = {n: where for n, where in code_citations().items() if n not in tags}
    assert not missing, f"equation numbers cited in npyrnn/ but not \\tag-ed in docs/derivations/: {missing}"


def test_every_derived_equation_is_cited():
    cited = code_citations()
    uncited = sorted(n for n in doc_tags() if n not in cited and n not in UNCITED_TAGS)
    assert not uncited, f"\\tag-ed in docs/derivations/ but cited nowhere in npyrnn/: {uncited}"
    stale = sorted(n for n in UNCITED_TAGS if n in cited)
    assert not stale, f"now cited by the code; remove from UNCITED_TAGS: {stale}"


def test_each_tag_once_and_in_its_chapter():
    for n, files in doc_tags().items():
        assert len(files) == 1, f"\\tag{{{n}}} appears {len(files)} times: {files}"
        assert files[0] == CHAPTERS.get(n.split(".")[0]), f"\\tag{{{n}}} is in {files[0]}"
    for chapter, name in CHAPTERS.items():
        assert (DERIVATIONS / name).exists(), f"docs/derivations/{name} (equations {chapter}.x) is missing"


# ------------------------------------------------------------------------------------------ (e)


def test_mkdocs_build_strict(tmp_path):
    missing = [m for m in ("mkdocs", "material", "mkdocstrings", "pymdownx") if importlib.util.find_spec(m) is None]
    assert not missing, f"{missing} not installed: the test extra installs the docs extra (pip install -e '.[test]')"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"),
         "-d", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=120, env=env,
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout}\n{result.stderr}"
    assert (tmp_path / "site" / "derivations" / "bptt" / "index.html").exists()
    # mkdocstrings renders Markdown: a reStructuredText role or `::` marker shows up as typed
    leftovers = []
    for page in sorted((tmp_path / "site").rglob("*.html")):
        text = re.sub(r"<[^>]+>", "", page.read_text(encoding="utf-8"))  # the text a reader sees
        for match in RST_LEFTOVER.finditer(text):
            leftovers.append(f"{page.relative_to(tmp_path / 'site')}: {text[max(0, match.start() - 30):match.end() + 20]!r}")
    assert not leftovers, "reStructuredText left in rendered pages (use Markdown):\n" + "\n".join(leftovers)


RST_LEFTOVER = re.compile(r":(?:func|class|mod|meth|data|attr|exc|obj|ref|doc):|\w::\s")


def test_rst_leftover_pattern_catches_roles():
    assert RST_LEFTOVER.search("see :func: set_backend") and RST_LEFTOVER.search("the module itself::\n")
    assert not RST_LEFTOVER.search("x[::2] and a::b") and not RST_LEFTOVER.search("`set_backend`")
