"""Text corpora on the host: find or download, read, clean, tokenise, turn into ids.

The first steps of d2l chapter 8 ("Text preprocessing"):

```text
text file -> lines -> tokens -> Vocab -> corpus of token ids
```

`npyrnn.data.vocab` holds the `Vocab`, `npyrnn.data.batches` cuts the ids into
minibatches. Everything here runs on the host with NumPy. `pooch`, `requests` and
`platformdirs` are imported only by the functions that download or look up the
cache, so a local corpus loads without them.

The Time Machine
----------------
`load_corpus('timemachine')` looks for `timemachine.txt` in this order:

1. `$NPYRNN_DATA_DIR/timemachine.txt` when `NPYRNN_DATA_DIR` is set;
2. the per-user cache, `$NPYRNN_CACHE_DIR` or else
   `platformdirs.user_cache_dir('npyrnn')`;
3. a download into that cache, trying the URLs in `$NPYRNN_TIMEMACHINE_URL`
   (space- or comma-separated) first and then `SOURCES`.

Every copy, found or downloaded, must have sha1 `TIMEMACHINE_SHA1`.

Errors
------
Bad input raises `DataError` (a `ValueError`) whose message is one
line: what is wrong, then how to fix it.
"""

import hashlib
import logging
import numbers
import os
import re
from pathlib import Path

import numpy

from npyrnn.data.vocab import Vocab
from npyrnn.errors import DataError

__all__ = [
    "TIMEMACHINE_SHA1",
    "TIMEMACHINE_SIZE",
    "TIMEMACHINE_FILENAME",
    "SOURCES",
    "cache_dir",
    "timemachine_path",
    "read_text",
    "clean_text",
    "strip_gutenberg",
    "read_lines",
    "clean_text",
    "read_time_machine",
    "clean_text",
    "tokenize",
    "load_corpus",
]

TIMEMACHINE_SHA1 = "090b5e7e70c295757f55df93cb0a180b9691891a"
TIMEMACHINE_SIZE = 178_979  # bytes
TIMEMACHINE_FILENAME = "timemachine.txt"

SOURCES = [
    "http://d2l-data.s3-accelerate.amazonaws.com/timemachine.txt",  # d2l's own address
    "https://d2l-data.s3.amazonaws.com/timemachine.txt",
]
"""Download sources for The Time Machine, tried in order after the URLs in `$NPYRNN_TIMEMACHINE_URL`.

Read at call time, so tests may replace it: assign a new list to `npyrnn.data.SOURCES` or to
`npyrnn.data.corpus.SOURCES` (the package forwards its name to this module, where the download
reads it), e.g. `monkeypatch.setattr(npyrnn.data.corpus, "SOURCES", [url])`.
"""

# Environment variables: a folder that holds timemachine.txt, the download cache, extra download URLs.
DATA_DIR_ENV = "NPYRNN_DATA_DIR"
CACHE_DIR_ENV = "NPYRNN_CACHE_DIR"
URL_ENV = "NPYRNN_TIMEMACHINE_URL"

_GUTENBERG_START = re.compile(r"^[ \t]*\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG.*$", re.IGNORECASE | re.MULTILINE)
_GUTENBERG_END = re.compile(r"^[ \t]*\*{3}\s*END OF (THE|THIS) PROJECT GUTENBERG.*$", re.IGNORECASE | re.MULTILINE)
_NOT_LETTERS = re.compile("[^A-Za-z]+")
_RAW_WORD = re.compile(r"\S+|\n")  # raw word tokens: whitespace-separated words, and each newline
TOKEN_KINDS = ("char", "word")
#: The largest corpus file read (bytes). Larger files are refused before reading.
MAX_CORPUS_BYTES = 1 << 30


# --------------------------------------------------------------------------- files


def _data_dir():
    """`$NPYRNN_DATA_DIR` as a Path, or None when it is unset or empty."""
    value = os.environ.get(DATA_DIR_ENV, "").strip()
    return Path(value).expanduser() if value else None


def cache_dir():
    """The per-user cache folder for downloaded corpora.

    Returns
    -------
    pathlib.Path
        `$NPYRNN_CACHE_DIR` when set, else `platformdirs.user_cache_dir('npyrnn')`.
        The folder is not created here.
    """
    value = os.environ.get(CACHE_DIR_ENV, "").strip()
    if value:
        return Path(value).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("npyrnn"))


def _sources():
    """Download URLs in the order to try: `$NPYRNN_TIMEMACHINE_URL` first, then SOURCES."""
    from_env = [url for url in re.split(r"[\s,]+", os.environ.get(URL_ENV, "")) if url]
    return list(dict.fromkeys(from_env + list(SOURCES)))  # drop repeats, keep order


def _sha1(path):
    """Hex sha1 of a file's bytes."""
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _short_reason(exc):
    """A few words on why one download failed."""
    import requests

    if isinstance(exc, requests.HTTPError) and exc.response is not None:
        return f"HTTP {exc.response.status_code}"
    if isinstance(exc, requests.Timeout):
        return "timed out"
    if isinstance(exc, requests.ConnectionError):
        return "cannot connect"
    if isinstance(exc, ValueError) and "hash" in str(exc).lower():
        return "sha1 mismatch, wrong or corrupted file"
    return type(exc).__name__


def _download(target_dir, note=""):
    """Fetch timemachine.txt into `target_dir` from the first source that works.

    pooch writes to a temporary file beside the target and moves it into place
    only after the sha1 matches, so a failed or wrong download leaves nothing.
    """
    import pooch

    pooch.get_logger().setLevel(logging.WARNING)
    failures = []
    for url in _sources():
        try:
            path = pooch.retrieve(
                url,
                known_hash=f"sha1:{TIMEMACHINE_SHA1}",
                fname=TIMEMACHINE_FILENAME,
                path=target_dir,
                progressbar=False,
            )
        except Exception as exc:  # requests errors, a sha1 mismatch (ValueError), an unsupported scheme...
            failures.append(f"{url}: {_short_reason(exc)}")
        else:
            return Path(path)
    where = _data_dir() or target_dir
    raise DataError(
        f"downloading {TIMEMACHINE_FILENAME} failed ({'; '.join(failures) or 'no sources configured'}){note}; "
        f"pass a local UTF-8 text file with --corpus PATH (or load_corpus(PATH)), "
        f"or put the verified file (sha1 {TIMEMACHINE_SHA1}, {TIMEMACHINE_SIZE} bytes) at "
        f"{where / TIMEMACHINE_FILENAME}, or set {DATA_DIR_ENV} to a folder that holds it"
    )


def timemachine_path(download=True):
    """Path to a verified copy of The Time Machine, downloading it if needed.

    Looks in `$NPYRNN_DATA_DIR`, then in `cache_dir`, then downloads
    into the cache (see the module docstring). A cached copy whose sha1 is
    wrong is deleted and fetched again.

    Parameters
    ----------
    download : bool, default True
        When False, never touch the network: a missing file is an error.

    Returns
    -------
    pathlib.Path
        A file whose sha1 is `TIMEMACHINE_SHA1`.

    Raises
    ------
    DataError
        The file in `$NPYRNN_DATA_DIR` has the wrong sha1; or no copy was
        found and `download` is False; or every download source failed.
    """
    data_dir = _data_dir()
    if data_dir is not None:
        candidate = data_dir / TIMEMACHINE_FILENAME
        if candidate.is_file():
            actual = _sha1(candidate)
            if actual != TIMEMACHINE_SHA1:
                raise DataError(
                    f"'{candidate}' (found through {DATA_DIR_ENV}) has sha1 {actual}, expected {TIMEMACHINE_SHA1}; "
                    f"replace it with the verified file ({TIMEMACHINE_SIZE} bytes), "
                    f"or unset {DATA_DIR_ENV} to use the cache and download"
                )
            return candidate

    cached = cache_dir() / TIMEMACHINE_FILENAME
    note = ""
    if cached.is_file():
        actual = _sha1(cached)
        if actual == TIMEMACHINE_SHA1:
            return cached
        cached.unlink()  # a truncated or corrupted cache entry: fetch a fresh copy
        note = f" (a corrupt cached copy with sha1 {actual} was removed from {cached.parent})"

    if not download:
        raise DataError(
            f"{TIMEMACHINE_FILENAME} is not in {DATA_DIR_ENV} or the cache {cached.parent}{note}; "
            f"call timemachine_path(download=True), or put the verified file (sha1 {TIMEMACHINE_SHA1}) at "
            f"{(data_dir or cached.parent) / TIMEMACHINE_FILENAME}, or pass --corpus PATH"
        )
    return _download(cached.parent, note)


# --------------------------------------------------------------------------- text


def strip_gutenberg(text):
    """Remove a Project Gutenberg header and footer when present.

    The header is everything up to and including the line
    `*** START OF THE PROJECT GUTENBERG EBOOK ... ***` (or `*** START OF THIS
    PROJECT GUTENBERG ...`); the footer is everything from the line
    `*** END OF THE/THIS PROJECT GUTENBERG ...` on. Matching ignores case.
    Text without those lines is returned unchanged.

    Parameters
    ----------
    text : str

    Returns
    -------
    str
    """
    start = _GUTENBERG_START.search(text)
    if start:
        text = text[start.end():].removeprefix("\n")
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[: end.start()]
    return text


def read_text(path):
    """Read a UTF-8 text file the way the corpus loaders see it.

    The bytes are decoded as UTF-8 (a leading byte-order mark is dropped),
    line ends `\\r\\n` and `\\r` become `\\n` (as Python's text mode does),
    and a Project Gutenberg header/footer is removed (`strip_gutenberg`).

    Parameters
    ----------
    path : str or os.PathLike

    Returns
    -------
    str

    Raises
    ------
    DataError
        The path does not exist, is a directory, cannot be read, or is not UTF-8.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(
            f"corpus file '{path}' not found; pass an existing UTF-8 text file with --corpus PATH "
            "or use --corpus timemachine"
        )
    if path.is_dir():
        raise DataError(
            f"corpus path '{path}' is a directory, not a file; pass a UTF-8 text file with --corpus PATH "
            "or use --corpus timemachine"
        )
    if not path.is_file():
        raise DataError(
            f"corpus path '{path}' is not a regular file (a device, pipe or socket would be read without end); "
            "pass a UTF-8 text file with --corpus PATH"
        )
    size = path.stat().st_size
    if size > MAX_CORPUS_BYTES:
        raise DataError(
            f"corpus file '{path}' has {size:,} bytes, more than npyrnn reads ({MAX_CORPUS_BYTES:,}: every "
            "character becomes an 8-byte id in memory); pass a smaller file, e.g. `head -c 100M FILE > SMALL`"
        )
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(
            f"cannot read corpus file '{path}' ({exc.strerror or type(exc).__name__}); "
            "check its permissions or pass another file with --corpus PATH"
        ) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"corpus file '{path}' is not UTF-8: byte 0x{data[exc.start]:02x} at offset {exc.start} cannot be decoded; "
            "the corpus must be UTF-8, so convert it (e.g. `iconv -f LATIN1 -t UTF-8 IN > OUT`) "
            "or pass another file with --corpus PATH"
        ) from None
    text = text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    return strip_gutenberg(text)


def _corpus_path(corpus):
    """'timemachine' -> the verified Time Machine file; anything else is a path."""
    if isinstance(corpus, str) and corpus == "timemachine":
        return timemachine_path()
    return Path(corpus)


def read_lines(corpus="timemachine", raw=False):
    """The lines of a corpus, preprocessed as d2l does unless `raw`.

    Parameters
    ----------
    corpus : 'timemachine' or str or os.PathLike
        The Time Machine (found or downloaded, see `timemachine_path`) or
        the path of any UTF-8 text file. To read a local file that is literally
        named `timemachine`, pass `'./timemachine'`.
    raw : bool, default False
        False: d2l's cleaning, `re.sub('[^A-Za-z]+', ' ', line).strip().lower()`
        on every line (so lines carry no newline, and may be empty).
        True: the text as it is, split after each `'\\n'`, which is kept.

    Returns
    -------
    list of str
    """
    text = read_text(_corpus_path(corpus))
    lines = text.split("\n")
    lines = [line + "\n" for line in lines[:-1]] + ([lines[-1]] if lines[-1] else [])
    if raw:
        return lines
    return [_NOT_LETTERS.sub(" ", line).strip().lower() for line in lines]


def clean_text(text):
    """d2l's cleaning of one line without the strip: every run of non-letters becomes one space, lower case.

    `npyrnn generate` applies it to the prefix of a model trained on cleaned text, so
    "Time Traveller!" reaches the model as "time traveller ".
    """
    return _NOT_LETTERS.sub(" ", text).lower()


def read_time_machine():
    """d2l's `read_time_machine`: the cleaned lines of The Time Machine.

    Returns
    -------
    list of str
        3221 lines, letters a-z and single spaces only.
    """
    return read_lines("timemachine")


def _check_token(token):
    if token not in TOKEN_KINDS:
        raise DataError(
            f"unknown token kind {token!r}; use token='char' (one token per character) "
            "or token='word' (whitespace-separated words)"
        )


def tokenize(lines, token="char"):
    """Split each line into tokens (d2l's `tokenize`).

    Parameters
    ----------
    lines : list of str
    token : {'char', 'word'}
        'char': `list(line)`; 'word': `line.split()`.

    Returns
    -------
    list of list of str
        One token list per line.
    """
    _check_token(token)
    if token == "char":
        return [list(line) for line in lines]
    return [line.split() for line in lines]


def load_corpus(corpus="timemachine", token="char", max_tokens=10000, raw=False, min_freq=0, reserved_tokens=None):
    """Token ids of a corpus and its vocabulary (d2l's `load_corpus_time_machine`).

    The steps, as in d2l: read the lines (`read_lines`), tokenise each
    (`tokenize`), build the `Vocab` from *all* tokens, concatenate
    the lines' tokens (so d2l's cleaned lines lose their line breaks), then
    keep the first `max_tokens` ids. On The Time Machine with char tokens
    this gives `len(vocab) == 28` and 10000 ids.

    Parameters
    ----------
    corpus : 'timemachine' or str or os.PathLike
        The Time Machine, or the path of any UTF-8 text file.
    token : {'char', 'word'}
    max_tokens : int or None, default 10000
        Keep this many ids; `None` or `<= 0` keeps them all.
    raw : bool, default False
        Keep the text as it is: no regex, no lower-casing, and `'\\n'` is a
        token (with `token='word'` the tokens are the whitespace-separated
        words plus one `'\\n'` token per line end).
    min_freq : int, default 0
    reserved_tokens : list of str, optional
        Passed to `Vocab`.

    Returns
    -------
    corpus : numpy.ndarray, shape (N,), int64
        Token ids on the host, `N = min(max_tokens, total tokens)`.
    vocab : Vocab

    Raises
    ------
    DataError
        Unknown `token`, bad `max_tokens`, a missing/unreadable/non-UTF-8
        file, a failed download, or no tokens left after preprocessing.
    """
    _check_token(token)  # before any download
    if max_tokens is not None and (not isinstance(max_tokens, numbers.Integral) or isinstance(max_tokens, bool)):
        raise DataError(
            f"max_tokens must be a whole number or None, got {max_tokens!r}; pass e.g. --max-tokens 10000 "
            "(0 or a negative number keeps the whole corpus)"
        )
    lines = read_lines(corpus, raw=raw)
    if raw and token == "word":
        tokens = [_RAW_WORD.findall(line) for line in lines]
    else:
        tokens = tokenize(lines, token)
    if not any(tokens):
        what = "is empty" if raw else "has no tokens after preprocessing (d2l's cleaning keeps only the letters A-Z)"
        raise DataError(
            f"corpus '{corpus}' {what}; pass a file that contains English text with --corpus PATH"
            + ("" if raw else ", or load it with raw=True to keep every character")
        )
    vocab = Vocab(tokens, min_freq=min_freq, reserved_tokens=reserved_tokens)
    ids = numpy.fromiter((vocab[t] for line in tokens for t in line), dtype=numpy.int64)
    if max_tokens is not None and max_tokens > 0:
        ids = ids[:max_tokens]
    return ids, vocab
