"""Text corpora for language models: download, cache, tokenise, count, batch.

The pipeline follows d2l chapter 8 ("Text preprocessing", "Language models and
the dataset")::

    text file -> lines -> tokens -> Vocab -> corpus of token ids -> minibatches X, Y

Everything here runs on the host with NumPy, except the minibatches, which the
iterators hand out on the active backend (:mod:`npyrnn.backend`).

The Time Machine
----------------
``load_corpus('timemachine')`` looks for ``timemachine.txt`` in this order:

1. ``$NPYRNN_DATA_DIR/timemachine.txt`` when ``NPYRNN_DATA_DIR`` is set;
2. the per-user cache, ``$NPYRNN_CACHE_DIR`` or else
   ``platformdirs.user_cache_dir('npyrnn')``;
3. a download into that cache, trying the URLs in ``$NPYRNN_TIMEMACHINE_URL``
   (space- or comma-separated) first and then :data:`SOURCES`.

Every copy, found or downloaded, must have sha1 :data:`TIMEMACHINE_SHA1`.

Errors
------
Bad input raises :class:`DataError` (a ``ValueError``) whose message is one
line: what is wrong, then how to fix it.
"""

import collections
import hashlib
import logging
import numbers
import os
import re
from pathlib import Path

import numpy

from npyrnn import backend
from npyrnn.errors import DataError

__all__ = [
    "DataError",
    "TIMEMACHINE_SHA1",
    "TIMEMACHINE_SIZE",
    "TIMEMACHINE_FILENAME",
    "SOURCES",
    "cache_dir",
    "timemachine_path",
    "read_text",
    "strip_gutenberg",
    "read_lines",
    "read_time_machine",
    "tokenize",
    "Vocab",
    "load_corpus",
    "seq_data_iter_random",
    "seq_data_iter_sequential",
    "SeqDataLoader",
]

TIMEMACHINE_SHA1 = "090b5e7e70c295757f55df93cb0a180b9691891a"
TIMEMACHINE_SIZE = 178_979  # bytes
TIMEMACHINE_FILENAME = "timemachine.txt"

#: Download sources for The Time Machine, tried in order after the URLs in
#: ``$NPYRNN_TIMEMACHINE_URL``. Read at call time, so tests may replace it.
SOURCES = [
    "http://d2l-data.s3-accelerate.amazonaws.com/timemachine.txt",  # d2l's own address
    "https://d2l-data.s3.amazonaws.com/timemachine.txt",
]

DATA_DIR_ENV = "NPYRNN_DATA_DIR"
CACHE_DIR_ENV = "NPYRNN_CACHE_DIR"
URL_ENV = "NPYRNN_TIMEMACHINE_URL"

_GUTENBERG_START = re.compile(r"^[ \t]*\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG.*$", re.IGNORECASE | re.MULTILINE)
_GUTENBERG_END = re.compile(r"^[ \t]*\*{3}\s*END OF (THE|THIS) PROJECT GUTENBERG.*$", re.IGNORECASE | re.MULTILINE)
_NOT_LETTERS = re.compile("[^A-Za-z]+")
_RAW_WORD = re.compile(r"\S+|\n")  # raw word tokens: whitespace-separated words, and each newline
TOKEN_KINDS = ("char", "word")


# --------------------------------------------------------------------------- files


def _data_dir():
    """``$NPYRNN_DATA_DIR`` as a Path, or None when it is unset or empty."""
    value = os.environ.get(DATA_DIR_ENV, "").strip()
    return Path(value).expanduser() if value else None


def cache_dir():
    """The per-user cache folder for downloaded corpora.

    Returns
    -------
    pathlib.Path
        ``$NPYRNN_CACHE_DIR`` when set, else ``platformdirs.user_cache_dir('npyrnn')``.
        The folder is not created here.
    """
    value = os.environ.get(CACHE_DIR_ENV, "").strip()
    if value:
        return Path(value).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("npyrnn"))


def _sources():
    """Download URLs in the order to try: ``$NPYRNN_TIMEMACHINE_URL`` first, then SOURCES."""
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
    """Fetch timemachine.txt into ``target_dir`` from the first source that works.

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

    Looks in ``$NPYRNN_DATA_DIR``, then in :func:`cache_dir`, then downloads
    into the cache (see the module docstring). A cached copy whose sha1 is
    wrong is deleted and fetched again.

    Parameters
    ----------
    download : bool, default True
        When False, never touch the network: a missing file is an error.

    Returns
    -------
    pathlib.Path
        A file whose sha1 is :data:`TIMEMACHINE_SHA1`.

    Raises
    ------
    DataError
        The file in ``$NPYRNN_DATA_DIR`` has the wrong sha1; or no copy was
        found and ``download`` is False; or every download source failed.
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
    ``*** START OF THE PROJECT GUTENBERG EBOOK ... ***`` (or ``*** START OF THIS
    PROJECT GUTENBERG ...``); the footer is everything from the line
    ``*** END OF THE/THIS PROJECT GUTENBERG ...`` on. Matching ignores case.
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
    line ends ``\\r\\n`` and ``\\r`` become ``\\n`` (as Python's text mode does),
    and a Project Gutenberg header/footer is removed (:func:`strip_gutenberg`).

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
    """The lines of a corpus, preprocessed as d2l does unless ``raw``.

    Parameters
    ----------
    corpus : 'timemachine' or str or os.PathLike
        The Time Machine (found or downloaded, see :func:`timemachine_path`) or
        the path of any UTF-8 text file. To read a local file that is literally
        named ``timemachine``, pass ``'./timemachine'``.
    raw : bool, default False
        False: d2l's cleaning, ``re.sub('[^A-Za-z]+', ' ', line).strip().lower()``
        on every line (so lines carry no newline, and may be empty).
        True: the text as it is, split after each ``'\\n'``, which is kept.

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


def read_time_machine():
    """d2l's ``read_time_machine``: the cleaned lines of The Time Machine.

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
    """Split each line into tokens (d2l's ``tokenize``).

    Parameters
    ----------
    lines : list of str
    token : {'char', 'word'}
        'char': ``list(line)``; 'word': ``line.split()``.

    Returns
    -------
    list of list of str
        One token list per line.
    """
    _check_token(token)
    if token == "char":
        return [list(line) for line in lines]
    return [line.split() for line in lines]


# --------------------------------------------------------------------------- vocabulary


def _count_tokens(tokens):
    """Counter of a flat token list or of a list of token lists (d2l's ``count_corpus``)."""
    if len(tokens) > 0 and isinstance(tokens[0], list):
        tokens = [token for line in tokens for token in line]
    return collections.Counter(tokens)


class Vocab:
    """Map tokens to integer ids and back (d2l's ``Vocab``).

    Index 0 is ``'<unk>'``, then come ``reserved_tokens``, then every token
    that occurs at least ``min_freq`` times, most frequent first; ties keep the
    order in which the tokens first occur.

    Parameters
    ----------
    tokens : list of str or list of list of str, optional
        A flat token list or one token list per line.
    min_freq : int, default 0
        Tokens rarer than this are left out (and map to ``<unk>``).
    reserved_tokens : list of str, optional
        Tokens placed right after ``<unk>`` whatever their frequency.

    Attributes
    ----------
    idx_to_token : list of str
        Token of each id; ``len(vocab)`` entries.
    token_to_idx : dict of str to int
    token_freqs : list of (str, int)
        Every counted token with its count, most frequent first (including
        those below ``min_freq``).
    """

    UNK = "<unk>"

    def __init__(self, tokens=None, min_freq=0, reserved_tokens=None):
        counter = _count_tokens([] if tokens is None else tokens)
        # sorted() is stable, so equal counts keep first-seen order (Counter keeps insertion order)
        self._token_freqs = sorted(counter.items(), key=lambda pair: pair[1], reverse=True)
        self.idx_to_token = []
        self.token_to_idx = {}
        for token in [self.UNK, *(reserved_tokens or [])]:
            self._add(token)
        for token, freq in self._token_freqs:
            if freq < min_freq:
                break
            self._add(token)

    def _add(self, token):
        if token not in self.token_to_idx:
            self.token_to_idx[token] = len(self.idx_to_token)
            self.idx_to_token.append(token)

    def __len__(self):
        return len(self.idx_to_token)

    def __getitem__(self, tokens):
        """Id of a token (0 for an unknown one), or a list of ids for a list/tuple, recursively."""
        if isinstance(tokens, (list, tuple)):
            return [self[token] for token in tokens]
        return self.token_to_idx.get(tokens, self.unk)

    def to_tokens(self, indices):
        """Token of an id, or a list of tokens for a sequence of ids.

        Parameters
        ----------
        indices : int, numpy integer, sequence of them, or a NumPy/CuPy integer array of any shape
            An array comes back as nested lists of the same shape.

        Returns
        -------
        str or list
        """
        if hasattr(indices, "ndim"):  # numpy/cupy arrays and numpy scalars
            indices = backend.to_numpy(indices).tolist()
        if isinstance(indices, numbers.Integral):
            if not 0 <= indices < len(self):
                raise DataError(
                    f"token id {int(indices)} is out of range for a vocabulary of {len(self)} tokens; "
                    f"ids must be in [0, {len(self)})"
                )
            return self.idx_to_token[int(indices)]
        return [self.to_tokens(index) for index in indices]

    @property
    def unk(self):
        """Id of the unknown token: 0."""
        return 0

    @property
    def token_freqs(self):
        """Every counted token with its count, most frequent first: list of (str, int)."""
        return self._token_freqs

    def to_dict(self):
        """A JSON-friendly description of this vocabulary, for checkpoints.

        Returns
        -------
        dict
            ``{'idx_to_token': [str, ...], 'token_freqs': [[str, int], ...]}``
        """
        return {
            "idx_to_token": list(self.idx_to_token),
            "token_freqs": [[token, int(freq)] for token, freq in self._token_freqs],
        }

    @classmethod
    def from_dict(cls, d):
        """Rebuild a vocabulary from :meth:`to_dict`'s output (also after a JSON round trip).

        Parameters
        ----------
        d : dict
            Needs ``'idx_to_token'`` (a list starting with ``'<unk>'``, no repeats);
            ``'token_freqs'`` is optional.

        Returns
        -------
        Vocab
        """
        idx_to_token = d.get("idx_to_token") if isinstance(d, dict) else None
        if (
            not isinstance(idx_to_token, list)
            or not idx_to_token
            or idx_to_token[0] != cls.UNK
            or len(set(idx_to_token)) != len(idx_to_token)
        ):
            raise DataError(
                "not a vocabulary dict: 'idx_to_token' must be a list of distinct tokens starting with '<unk>'; "
                "pass the dict that Vocab.to_dict() returned"
            )
        vocab = cls()
        vocab.idx_to_token = []
        vocab.token_to_idx = {}
        for token in idx_to_token:
            vocab._add(token)
        vocab._token_freqs = [(token, int(freq)) for token, freq in d.get("token_freqs", [])]
        return vocab

    def __repr__(self):
        head = ", ".join(repr(t) for t in self.idx_to_token[:8])
        more = ", ..." if len(self) > 8 else ""
        return f"Vocab(size={len(self)}, tokens=[{head}{more}])"


# --------------------------------------------------------------------------- corpus


def load_corpus(corpus="timemachine", token="char", max_tokens=10000, raw=False, min_freq=0, reserved_tokens=None):
    """Token ids of a corpus and its vocabulary (d2l's ``load_corpus_time_machine``).

    The steps, as in d2l: read the lines (:func:`read_lines`), tokenise each
    (:func:`tokenize`), build the :class:`Vocab` from *all* tokens, concatenate
    the lines' tokens (so d2l's cleaned lines lose their line breaks), then
    keep the first ``max_tokens`` ids. On The Time Machine with char tokens
    this gives ``len(vocab) == 28`` and 10000 ids.

    Parameters
    ----------
    corpus : 'timemachine' or str or os.PathLike
        The Time Machine, or the path of any UTF-8 text file.
    token : {'char', 'word'}
    max_tokens : int or None, default 10000
        Keep this many ids; ``None`` or ``<= 0`` keeps them all.
    raw : bool, default False
        Keep the text as it is: no regex, no lower-casing, and ``'\\n'`` is a
        token (with ``token='word'`` the tokens are the whitespace-separated
        words plus one ``'\\n'`` token per line end).
    min_freq : int, default 0
    reserved_tokens : list of str, optional
        Passed to :class:`Vocab`.

    Returns
    -------
    corpus : numpy.ndarray, shape (N,), int64
        Token ids on the host, ``N = min(max_tokens, total tokens)``.
    vocab : Vocab

    Raises
    ------
    DataError
        Unknown ``token``, bad ``max_tokens``, a missing/unreadable/non-UTF-8
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


# --------------------------------------------------------------------------- minibatches


def _check_positive_int(name, value, flag):
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
        raise DataError(f"{name} must be a whole number >= 1, got {value!r}; pass e.g. {flag}")


def _checked_corpus(corpus, batch_size, num_steps):
    """The corpus as a 1-D int64 host array, after every up-front check of the iterator arguments."""
    _check_positive_int("batch_size", batch_size, "--batch-size 32")
    _check_positive_int("num_steps", num_steps, "--num-steps 35")
    ids = numpy.asarray(backend.to_numpy(corpus))
    if ids.ndim != 1 or not (ids.size == 0 or numpy.issubdtype(ids.dtype, numpy.integer)):
        raise DataError(
            f"corpus must be a 1-D array of integer token ids, got shape {ids.shape} dtype {ids.dtype}; "
            "pass the first value that load_corpus returns"
        )
    needed = batch_size * num_steps + num_steps
    if len(ids) < needed:
        raise DataError(
            f"corpus has {len(ids)} tokens but batch_size={batch_size} x num_steps={num_steps} needs at least "
            f"{needed} (batch_size*num_steps + num_steps, so that every start offset fills one minibatch); "
            "use a smaller --batch-size or --num-steps, or a longer corpus (a larger --max-tokens or another --corpus)"
        )
    return ids.astype(numpy.int64, copy=False)


def _check_rng(rng):
    if not isinstance(rng, numpy.random.Generator):
        raise DataError(
            f"rng must be a numpy.random.Generator, got {type(rng).__name__}; create one per run with "
            "numpy.random.default_rng(seed) and pass the same generator every epoch"
        )


def _num_batches(num_tokens, batch_size, num_steps, offset, use_random_iter):
    """Minibatches an epoch yields when it starts at ``offset``."""
    if use_random_iter:
        num_subseqs = (num_tokens - offset - 1) // num_steps
        return num_subseqs // batch_size
    row_length = (num_tokens - offset - 1) // batch_size
    return row_length // num_steps


def _batches(corpus, batch_size, num_steps, rng, use_random_iter, max_batches=None):
    """One epoch of minibatches; the shared body of both iterators.

    Each minibatch is a (batch_size, num_steps + 1) window of the corpus per
    row: X is its first num_steps columns, Y its last num_steps. The window
    starts are computed on the host, the whole epoch's windows are gathered
    on the host and copied to the backend at once, and each step then slices
    there.
    """
    L, B, T = len(corpus), batch_size, num_steps
    offset = int(rng.integers(0, T))  # in [0, T)
    num_batches = _num_batches(L, B, T, offset, use_random_iter)
    if max_batches is not None:
        num_batches = min(num_batches, max_batches)
    if use_random_iter:
        # subsequence k is corpus[offset + k*T : offset + (k+1)*T]; visit them in random order
        num_subseqs = (L - offset - 1) // T
        order = rng.permutation(num_subseqs)[: num_batches * B]
        starts = offset + T * order.reshape(num_batches, B)  # (num_batches, B)
    else:
        # row r of the epoch is corpus[offset + r*n : offset + (r+1)*n]; minibatch i is its i-th block of T
        row_length = (L - offset - 1) // B
        starts = offset + row_length * numpy.arange(B)[None, :] + T * numpy.arange(num_batches)[:, None]
    windows = corpus[starts[:, :, None] + numpy.arange(T + 1)]  # (num_batches, B, T+1), host
    windows = backend.asarray(windows, dtype=numpy.int64)  # the epoch's one host->device copy
    xp = backend.get_array_module(windows)

    def generate():
        for i in range(num_batches):
            window = windows[i]  # (B, T+1)
            yield xp.ascontiguousarray(window[:, :-1]), xp.ascontiguousarray(window[:, 1:])

    return generate()


def seq_data_iter_random(corpus, batch_size, num_steps, *, rng):
    """Minibatches of random, non-overlapping subsequences (d2l's ``seq_data_iter_random``).

    Drop a random prefix of ``rng.integers(0, num_steps)`` tokens, cut the rest
    into subsequences of ``num_steps`` tokens (each with its target shifted by
    one), shuffle them with ``rng``, and yield ``num_subseqs // batch_size``
    minibatches. Adjacent minibatches are not adjacent in the corpus, so the
    hidden state must be reset before each one.

    Parameters
    ----------
    corpus : integer array-like, shape (N,)
        Token ids, e.g. the first value that :func:`load_corpus` returns.
    batch_size, num_steps : int
        B and T, each at least 1, with ``N >= B*T + T``.
    rng : numpy.random.Generator
        Draws the offset and the order. Pass one generator for the whole run:
        epochs then differ and the run repeats from its seed.

    Returns
    -------
    iterator of (X, Y)
        ``X, Y`` are int64 arrays of shape (B, T) on the active backend, with
        ``Y[b, t]`` the corpus token right after ``X[b, t]``. All checks and
        the random draws happen when this function is called.

    Raises
    ------
    DataError
        ``batch_size`` or ``num_steps`` below 1, or ``N < B*T + T``.
    """
    corpus = _checked_corpus(corpus, batch_size, num_steps)
    _check_rng(rng)
    return _batches(corpus, batch_size, num_steps, rng, use_random_iter=True)


def seq_data_iter_sequential(corpus, batch_size, num_steps, *, rng):
    """Minibatches that continue each other (d2l's ``seq_data_iter_sequential``).

    Drop a random prefix of ``offset = rng.integers(0, num_steps)`` tokens
    (``0 <= offset < num_steps``), split the rest into ``batch_size`` equal rows,
    and yield consecutive blocks of ``num_steps`` columns, so row ``r`` of
    minibatch ``i + 1`` starts right where row ``r`` of minibatch ``i`` ended and
    the hidden state can be carried over.

    d2l draws ``random.randint(0, num_steps)``, which includes ``num_steps``:
    that offset wastes a whole subsequence and adds nothing an offset of 0 does
    not already give (d2l-zh pull requests 1301, 1302 and 1337). Here the
    offset stays below ``num_steps``.

    Parameters
    ----------
    corpus : integer array-like, shape (N,)
    batch_size, num_steps : int
        B and T, each at least 1, with ``N >= B*T + T``.
    rng : numpy.random.Generator

    Returns
    -------
    iterator of (X, Y)
        ``X, Y`` int64 arrays of shape (B, T) on the active backend; with
        ``n = (N - offset - 1) // B`` tokens per row, it yields ``n // T``
        minibatches. All tokens but fewer than ``B*T + T`` are used as inputs.

    Raises
    ------
    DataError
        ``batch_size`` or ``num_steps`` below 1, or ``N < B*T + T``.
    """
    corpus = _checked_corpus(corpus, batch_size, num_steps)
    _check_rng(rng)
    return _batches(corpus, batch_size, num_steps, rng, use_random_iter=False)


class SeqDataLoader:
    """An iterable over minibatches, one epoch per ``iter()`` (d2l's ``SeqDataLoader``).

    Parameters
    ----------
    corpus : integer array-like, shape (N,)
    batch_size, num_steps : int
    use_random_iter : bool, default False
        :func:`seq_data_iter_random` when True, else :func:`seq_data_iter_sequential`.
    rng : numpy.random.Generator, optional
        Kept and used by every epoch; default ``numpy.random.default_rng(0)``.

    Notes
    -----
    How many minibatches an epoch holds depends on its random offset. So that
    ``len(loader)`` is exact, every epoch yields the number that the largest
    offset, ``num_steps - 1``, allows (the minimum over offsets); an epoch with
    a smaller offset drops its extra last minibatch, if any.
    """

    def __init__(self, corpus, batch_size, num_steps, use_random_iter=False, rng=None):
        self.corpus = _checked_corpus(corpus, batch_size, num_steps)
        self.batch_size = batch_size
        self.num_steps = num_steps
        self.use_random_iter = bool(use_random_iter)
        self.rng = numpy.random.default_rng(0) if rng is None else rng
        _check_rng(self.rng)

    def __len__(self):
        return _num_batches(len(self.corpus), self.batch_size, self.num_steps, self.num_steps - 1, self.use_random_iter)

    def __iter__(self):
        return _batches(
            self.corpus, self.batch_size, self.num_steps, self.rng, self.use_random_iter, max_batches=len(self)
        )
