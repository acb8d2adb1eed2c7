"""Tests of npyrnn.data: corpus files and downloads, d2l preprocessing, Vocab, minibatch iterators.

No test reaches the internet: an autouse fixture points every download source at
a closed port on 127.0.0.1, and the download tests serve files from a local
http.server. The Time Machine comes from NPYRNN_DATA_DIR (conftest.py defaults it
to ../shared/data).
"""

import hashlib
import json
import logging
import os
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from npyrnn import backend, data
from npyrnn.data import DataError, SeqDataLoader, Vocab, seq_data_iter_random, seq_data_iter_sequential

ITERATORS = [seq_data_iter_sequential, seq_data_iter_random]
SHA1 = data.TIMEMACHINE_SHA1


# --------------------------------------------------------------------------- fixtures and helpers


def _closed_port_url():
    """A URL on 127.0.0.1 whose port nothing listens on (connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/timemachine.txt"


@pytest.fixture(autouse=True)
def _no_internet(monkeypatch, tmp_path):
    """Every test: sources are a dead local port, the cache is a fresh temp dir, no proxies."""
    monkeypatch.setattr(data, "SOURCES", [_closed_port_url()])
    monkeypatch.delenv(data.URL_ENV, raising=False)
    monkeypatch.setenv(data.CACHE_DIR_ENV, str(tmp_path / "cache"))
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


@pytest.fixture(scope="session")
def good_bytes():
    """The verified Time Machine, read from NPYRNN_DATA_DIR."""
    path = Path(os.environ.get(data.DATA_DIR_ENV, "")) / data.TIMEMACHINE_FILENAME
    if not path.is_file():
        pytest.fail(f"tests need {path}: set NPYRNN_DATA_DIR to a folder with the verified timemachine.txt")
    return path.read_bytes()


@pytest.fixture
def cache(tmp_path):
    """The cache dir that _no_internet set (not created yet)."""
    return tmp_path / "cache"


@pytest.fixture
def no_data_dir(monkeypatch, tmp_path):
    """NPYRNN_DATA_DIR is an empty folder, so the cache and download paths run."""
    empty = tmp_path / "empty-data-dir"
    empty.mkdir()
    monkeypatch.setenv(data.DATA_DIR_ENV, str(empty))
    return empty


class _Server:
    """A local HTTP server: ``routes`` maps a path to bytes (200) or a status code."""

    def __init__(self):
        self.routes = {}
        self.requests = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                outer.requests.append(self.path)
                body = outer.routes.get(self.path, 404)
                if isinstance(body, int):
                    self.send_error(body)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
        self.thread.start()

    def url(self, path):
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


@pytest.fixture
def server(good_bytes):
    """A local server with the good file at /good and a one-byte-corrupted copy at /corrupt."""
    srv = _Server()
    srv.routes["/good"] = good_bytes
    srv.routes["/corrupt"] = good_bytes[:100] + b"X" + good_bytes[101:]
    yield srv
    srv.close()


def sha1_of(path):
    return hashlib.sha1(Path(path).read_bytes()).hexdigest()


def listing(folder):
    """Names in a folder (empty when the folder does not exist)."""
    return sorted(p.name for p in Path(folder).iterdir()) if Path(folder).exists() else []


def one_line(exc_info):
    """The DataError's message, after checking that it is a single line."""
    msg = str(exc_info.value)
    assert "\n" not in msg, f"message spans lines: {msg!r}"
    return msg


def write(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return path


def positions_corpus(n):
    """A corpus whose token ids equal their positions, so a batch shows where it came from."""
    return np.arange(n, dtype=np.int64)


def epoch(iterator_or_loader):
    """All (X, Y) of one epoch as host arrays."""
    return [(backend.to_numpy(X), backend.to_numpy(Y)) for X, Y in iterator_or_loader]


# --------------------------------------------------------------------------- errors for bad input


def test_missing_file_error(tmp_path):
    with pytest.raises(DataError) as e:
        data.load_corpus(tmp_path / "nope.txt")
    msg = one_line(e)
    assert "nope.txt' not found" in msg and "--corpus PATH" in msg and "--corpus timemachine" in msg


def test_directory_error(tmp_path):
    with pytest.raises(DataError) as e:
        data.load_corpus(tmp_path)
    msg = one_line(e)
    assert "is a directory" in msg and "--corpus PATH" in msg


def test_non_utf8_error_names_the_byte_offset(tmp_path):
    path = write(tmp_path, "latin1.txt", "caf\u00e9 au lait".encode("latin-1"))  # 0xe9 at offset 3
    with pytest.raises(DataError) as e:
        data.load_corpus(path)
    msg = one_line(e)
    assert "not UTF-8" in msg and "0xe9 at offset 3" in msg and "must be UTF-8" in msg and str(path) in msg


def test_empty_after_preprocessing_error(tmp_path):
    path = write(tmp_path, "digits.txt", "1234 5678\n!!! ???\n")
    with pytest.raises(DataError) as e:
        data.load_corpus(path)
    msg = one_line(e)
    assert "no tokens after preprocessing" in msg and "raw=True" in msg
    # the same file keeps its characters in raw mode
    corpus, _ = data.load_corpus(path, raw=True, max_tokens=None)
    assert len(corpus) == len("1234 5678\n!!! ???\n")


def test_empty_file_error_in_raw_mode(tmp_path):
    with pytest.raises(DataError) as e:
        data.load_corpus(write(tmp_path, "empty.txt", ""), raw=True)
    assert "is empty" in one_line(e)


def test_only_gutenberg_boilerplate_is_empty(tmp_path):
    text = (
        "Licence blah\n"
        "*** START OF THE PROJECT GUTENBERG EBOOK X ***\n"
        "*** END OF THE PROJECT GUTENBERG EBOOK X ***\n"
    )
    with pytest.raises(DataError) as e:
        data.load_corpus(write(tmp_path, "g.txt", text))
    assert "no tokens" in one_line(e)


@pytest.mark.parametrize("iterator", ITERATORS)
def test_corpus_too_short_error(iterator):
    # B*T + T = 4*5 + 5 = 25 tokens are needed
    with pytest.raises(DataError) as e:
        iterator(positions_corpus(24), 4, 5, rng=np.random.default_rng(0))
    msg = one_line(e)
    assert "has 24 tokens" in msg and "at least 25" in msg and "--batch-size" in msg and "--num-steps" in msg
    # exactly the minimum works and fills one minibatch at every offset
    for seed in range(20):
        assert len(epoch(iterator(positions_corpus(25), 4, 5, rng=np.random.default_rng(seed)))) == 1


def test_corpus_too_short_error_from_loader():
    with pytest.raises(DataError) as e:
        SeqDataLoader(positions_corpus(10), 3, 3)
    assert "has 10 tokens" in one_line(e) and "at least 12" in str(e.value)


@pytest.mark.parametrize("iterator", ITERATORS)
@pytest.mark.parametrize("bad", [0, -2, 2.5, True, None])
def test_invalid_batch_size_and_num_steps(iterator, bad):
    corpus, rng = positions_corpus(100), np.random.default_rng(0)
    with pytest.raises(DataError) as e:
        iterator(corpus, bad, 5, rng=rng)
    msg = one_line(e)
    assert msg.startswith("batch_size must be a whole number >= 1") and "--batch-size" in msg
    with pytest.raises(DataError) as e:
        iterator(corpus, 2, bad, rng=rng)
    msg = one_line(e)
    assert msg.startswith("num_steps must be a whole number >= 1") and "--num-steps" in msg


def test_errors_are_raised_up_front_not_on_first_next():
    """The iterators check when called, so a bad config fails before any training starts."""
    with pytest.raises(DataError):
        seq_data_iter_sequential(positions_corpus(5), 2, 3, rng=np.random.default_rng(0))  # no next()


def test_unknown_token_kind(tmp_path):
    with pytest.raises(DataError) as e:
        data.load_corpus(tmp_path / "never-read.txt", token="byte")  # checked before the file is opened
    msg = one_line(e)
    assert "unknown token kind 'byte'" in msg and "token='char'" in msg and "token='word'" in msg
    with pytest.raises(DataError):
        data.tokenize(["abc"], token="bpe")


def test_bad_max_tokens(tmp_path):
    with pytest.raises(DataError) as e:
        data.load_corpus(write(tmp_path, "a.txt", "abc"), max_tokens=1e4)
    assert "max_tokens" in one_line(e) and "--max-tokens" in str(e.value)


@pytest.mark.parametrize("iterator", ITERATORS)
def test_rng_must_be_a_generator_and_a_keyword(iterator):
    with pytest.raises(DataError) as e:
        iterator(positions_corpus(100), 2, 3, rng=0)
    assert "numpy.random.Generator" in one_line(e) and "default_rng" in str(e.value)
    with pytest.raises(TypeError):
        iterator(positions_corpus(100), 2, 3, np.random.default_rng(0))  # rng is keyword-only


def test_corpus_must_be_1d_integers():
    with pytest.raises(DataError) as e:
        seq_data_iter_random(np.zeros((10, 10), dtype=np.int64), 2, 3, rng=np.random.default_rng(0))
    assert "1-D array of integer token ids" in one_line(e)


# --------------------------------------------------------------------------- The Time Machine: local copies


def test_timemachine_from_data_dir(good_bytes, server, monkeypatch, cache):
    monkeypatch.setattr(data, "SOURCES", [server.url("/good")])
    path = data.timemachine_path()
    assert path == Path(os.environ[data.DATA_DIR_ENV]) / "timemachine.txt"
    assert server.requests == [] and listing(cache) == []


def test_wrong_file_in_data_dir_is_an_error(tmp_path, monkeypatch, server):
    bad_dir = tmp_path / "data"
    bad_dir.mkdir()
    write(bad_dir, "timemachine.txt", "not the book")
    monkeypatch.setenv(data.DATA_DIR_ENV, str(bad_dir))
    monkeypatch.setattr(data, "SOURCES", [server.url("/good")])
    with pytest.raises(DataError) as e:
        data.timemachine_path()
    msg = one_line(e)
    assert str(bad_dir / "timemachine.txt") in msg and f"expected {SHA1}" in msg and "NPYRNN_DATA_DIR" in msg
    assert server.requests == []  # a wrong file is reported, not silently bypassed


def test_cache_dir_from_env_and_platformdirs(monkeypatch, tmp_path):
    import platformdirs

    assert data.cache_dir() == tmp_path / "cache"
    monkeypatch.delenv(data.CACHE_DIR_ENV)
    assert data.cache_dir() == Path(platformdirs.user_cache_dir("npyrnn"))


def test_no_download_when_told_not_to(no_data_dir, server, monkeypatch, cache):
    monkeypatch.setattr(data, "SOURCES", [server.url("/good")])
    with pytest.raises(DataError) as e:
        data.timemachine_path(download=False)
    msg = one_line(e)
    assert "not in NPYRNN_DATA_DIR or the cache" in msg and SHA1 in msg and "--corpus PATH" in msg
    assert server.requests == []


# --------------------------------------------------------------------------- The Time Machine: downloads


def test_download_into_cache_then_reuse(no_data_dir, server, monkeypatch, cache):
    monkeypatch.setattr(data, "SOURCES", [server.url("/good")])
    path = data.timemachine_path()
    assert path == cache / "timemachine.txt" and sha1_of(path) == SHA1
    assert server.requests == ["/good"]
    assert listing(cache) == ["timemachine.txt"]  # no temp files left beside it
    import pooch

    assert pooch.get_logger().level >= logging.WARNING
    # the second call finds the verified cached copy and does not download again
    corpus, vocab = data.load_corpus("timemachine")
    assert server.requests == ["/good"] and len(corpus) == 10000 and len(vocab) == 28


def test_download_hash_mismatch_leaves_nothing(monkeypatch, server, cache):
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    monkeypatch.setattr(data, "SOURCES", [server.url("/corrupt")])
    with pytest.raises(DataError) as e:
        data.timemachine_path()
    msg = one_line(e)
    assert "/corrupt: sha1 mismatch" in msg and "--corpus PATH" in msg
    assert server.requests == ["/corrupt"]
    assert listing(cache) == []  # neither timemachine.txt nor a stray temporary file


def test_download_falls_back_after_404(no_data_dir, monkeypatch, server, cache):
    monkeypatch.setattr(data, "SOURCES", [server.url("/missing"), server.url("/good")])
    path = data.timemachine_path()
    assert server.requests == ["/missing", "/good"]
    assert sha1_of(path) == SHA1 and listing(cache) == ["timemachine.txt"]


def test_download_falls_back_after_corrupt_source(no_data_dir, monkeypatch, server, cache):
    monkeypatch.setattr(data, "SOURCES", [server.url("/corrupt"), server.url("/good")])
    assert sha1_of(data.timemachine_path()) == SHA1
    assert server.requests == ["/corrupt", "/good"] and listing(cache) == ["timemachine.txt"]


def test_env_urls_are_tried_first(no_data_dir, monkeypatch, server):
    monkeypatch.setattr(data, "SOURCES", [server.url("/never")])
    monkeypatch.setenv(data.URL_ENV, f"{server.url('/missing')} ,{server.url('/good')}")
    assert sha1_of(data.timemachine_path()) == SHA1
    assert server.requests == ["/missing", "/good"]


def test_all_sources_unreachable(no_data_dir, monkeypatch, cache):
    dead = _closed_port_url()
    monkeypatch.setattr(data, "SOURCES", [dead])
    with pytest.raises(DataError) as e:
        data.load_corpus("timemachine")
    msg = one_line(e)
    assert msg.startswith("downloading timemachine.txt failed")
    assert f"{dead}: cannot connect" in msg
    assert "--corpus PATH" in msg and "load_corpus(PATH)" in msg and "NPYRNN_DATA_DIR" in msg
    assert f"sha1 {SHA1}" in msg and str(no_data_dir / "timemachine.txt") in msg
    assert listing(cache) == []


def test_all_sources_unreachable_without_data_dir_names_the_cache(monkeypatch, cache):
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    with pytest.raises(DataError) as e:
        data.timemachine_path()
    assert str(cache / "timemachine.txt") in one_line(e)
    assert listing(cache) == []


def test_corrupt_cache_is_downloaded_again(no_data_dir, monkeypatch, server, cache):
    cache.mkdir()
    write(cache, "timemachine.txt", "truncated")
    monkeypatch.setattr(data, "SOURCES", [server.url("/good")])
    path = data.timemachine_path()
    assert sha1_of(path) == SHA1 and server.requests == ["/good"]


def test_corrupt_cache_offline_is_reported_and_removed(no_data_dir, cache):
    cache.mkdir()
    write(cache, "timemachine.txt", "truncated")
    with pytest.raises(DataError) as e:
        data.timemachine_path()
    msg = one_line(e)
    assert "corrupt cached copy" in msg and "--corpus PATH" in msg
    assert listing(cache) == []


# --------------------------------------------------------------------------- text files


def test_gutenberg_header_and_footer_are_stripped(tmp_path):
    body = "It was a dark night.\nThe end.\n"
    text = (
        "The Project Gutenberg eBook of Something\nLicence text\n"
        "*** START OF THE PROJECT GUTENBERG EBOOK SOMETHING ***\n"
        + body
        + "*** END OF THE PROJECT GUTENBERG EBOOK SOMETHING ***\nMore licence\n"
    )
    path = write(tmp_path, "pg.txt", text)
    assert data.read_text(path) == body
    corpus, vocab = data.load_corpus(path, raw=True, max_tokens=None)
    assert "".join(vocab.to_tokens(corpus)) == body
    assert data.read_lines(path) == ["it was a dark night", "the end"]


def test_gutenberg_markers_ignore_case_and_this(tmp_path):
    text = (
        "header\n"
        "*** start of this project gutenberg ebook x ***\n"
        "body\n"
        "*** end of this project gutenberg ebook ***\n"
    )
    assert data.read_text(write(tmp_path, "pg.txt", text)) == "body\n"


def test_text_without_markers_is_unchanged():
    text = "No markers here.\n*** A line of stars ***\n"
    assert data.strip_gutenberg(text) == text


def test_line_ends_and_byte_order_mark(tmp_path):
    path = write(tmp_path, "crlf.txt", b"\xef\xbb\xbfOne\r\nTwo\rThree")
    assert data.read_text(path) == "One\nTwo\nThree"
    assert data.read_lines(path, raw=True) == ["One\n", "Two\n", "Three"]


def test_raw_mode_keeps_every_character(tmp_path):
    text = "Hi, You!\n\nX-ray 42.\n"
    path = write(tmp_path, "raw.txt", text)
    corpus, vocab = data.load_corpus(path, raw=True, max_tokens=None)
    assert "".join(vocab.to_tokens(corpus)) == text
    assert {"\n", ",", "H", "4", "!"} <= set(vocab.idx_to_token)
    words, wvocab = data.load_corpus(path, token="word", raw=True, max_tokens=None)
    assert wvocab.to_tokens(words) == ["Hi,", "You!", "\n", "\n", "X-ray", "42.", "\n"]
    # the same file through d2l's cleaning
    cleaned, cvocab = data.load_corpus(path, max_tokens=None)
    assert "".join(cvocab.to_tokens(cleaned)) == "hi you" + "x ray"


def test_tokenize_char_and_word():
    lines = ["the time", "", "machine by"]
    assert data.tokenize(lines) == [list("the time"), [], list("machine by")]
    assert data.tokenize(lines, token="word") == [["the", "time"], [], ["machine", "by"]]


# --------------------------------------------------------------------------- d2l's numbers on The Time Machine


def test_read_time_machine_matches_d2l():
    lines = data.read_time_machine()
    assert len(lines) == 3221
    assert lines[0] == "the time machine by h g wells"
    assert lines[10] == "twinkled and his usually pale face was flushed and animated the"
    assert all(set(line) <= set(" abcdefghijklmnopqrstuvwxyz") for line in lines)


def test_load_corpus_char_matches_d2l():
    corpus, vocab = data.load_corpus("timemachine", token="char", max_tokens=10000)
    assert isinstance(corpus, np.ndarray) and corpus.dtype == np.int64 and corpus.shape == (10000,)
    assert len(vocab) == 28
    assert vocab.idx_to_token[:10] == ["<unk>", " ", "e", "t", "a", "i", "n", "o", "s", "h"]
    lines = data.read_time_machine()
    text = "".join(lines)  # d2l concatenates the lines without separators
    assert "".join(vocab.to_tokens(corpus)) == text[:10000]
    full, full_vocab = data.load_corpus("timemachine", max_tokens=None)
    assert len(full) == sum(len(line) for line in lines) == 170580
    assert full_vocab.idx_to_token == vocab.idx_to_token  # the vocab is built before truncation
    assert len(data.load_corpus("timemachine", max_tokens=0)[0]) == 170580


def test_load_corpus_word_matches_d2l():
    corpus, vocab = data.load_corpus("timemachine", token="word", max_tokens=None)
    assert len(vocab) == 4580 and len(corpus) == 32775
    assert vocab.idx_to_token[:10] == ["<unk>", "the", "i", "and", "of", "a", "to", "was", "in", "that"]


def test_load_corpus_passes_min_freq_and_reserved_tokens():
    corpus, vocab = data.load_corpus("timemachine", token="word", min_freq=5, reserved_tokens=["<pad>"])
    assert vocab.idx_to_token[:3] == ["<unk>", "<pad>", "the"]
    assert all(freq >= 5 for token, freq in vocab.token_freqs if token in vocab.token_to_idx)
    assert len(vocab) < 4580 and (corpus == vocab.unk).any()


# --------------------------------------------------------------------------- Vocab


def test_vocab_order_ties_and_min_freq():
    vocab = Vocab(list("cab") + list("bb"))  # b:3, then c:1 and a:1 in first-seen order
    assert vocab.idx_to_token == ["<unk>", "b", "c", "a"]
    assert vocab.token_freqs == [("b", 3), ("c", 1), ("a", 1)]
    assert vocab.token_to_idx == {"<unk>": 0, "b": 1, "c": 2, "a": 3}
    rare_cut = Vocab(list("aaabbc"), min_freq=2)
    assert rare_cut.idx_to_token == ["<unk>", "a", "b"] and rare_cut["c"] == rare_cut.unk == 0
    assert rare_cut.token_freqs[-1] == ("c", 1)  # counted, though not in the vocabulary


def test_vocab_flat_and_nested_agree_and_reserved_tokens():
    nested = Vocab([["a", "b"], ["b"]], reserved_tokens=["<pad>", "<bos>"])
    flat = Vocab(["a", "b", "b"], reserved_tokens=["<pad>", "<bos>"])
    assert nested.idx_to_token == flat.idx_to_token == ["<unk>", "<pad>", "<bos>", "b", "a"]
    assert len(Vocab()) == 1 and Vocab().idx_to_token == ["<unk>"]


def test_vocab_lookup_both_ways():
    vocab = Vocab(list("hello"))  # l:2, h, e, o
    assert len(vocab) == 5
    assert vocab["l"] == 1 and vocab["z"] == 0
    assert vocab[["h", ("e", "z")]] == [2, [3, 0]]
    assert vocab.to_tokens(1) == "l" and vocab.to_tokens(np.int64(2)) == "h"
    assert vocab.to_tokens([2, 3, 1, 1, 4]) == list("hello")
    assert vocab.to_tokens(np.array([[2, 3], [1, 4]])) == [["h", "e"], ["l", "o"]]
    with pytest.raises(DataError) as e:
        vocab.to_tokens(5)
    assert "out of range for a vocabulary of 5 tokens" in one_line(e)
    assert repr(vocab).startswith("Vocab(size=5")


def test_vocab_to_tokens_takes_backend_arrays(xp):
    vocab = Vocab(list("hello"))
    assert vocab.to_tokens(xp.asarray([2, 3])) == ["h", "e"]


def test_vocab_dict_round_trip_through_json():
    _, vocab = data.load_corpus("timemachine", token="word", min_freq=2, reserved_tokens=["<pad>"])
    back = Vocab.from_dict(json.loads(json.dumps(vocab.to_dict())))
    assert back.idx_to_token == vocab.idx_to_token
    assert back.token_to_idx == vocab.token_to_idx
    assert back.token_freqs == vocab.token_freqs
    assert back[["the", "time", "zzz"]] == vocab[["the", "time", "zzz"]]


@pytest.mark.parametrize("bad", [{}, {"idx_to_token": ["a", "b"]}, {"idx_to_token": ["<unk>", "a", "a"]}, []])
def test_vocab_from_bad_dict(bad):
    with pytest.raises(DataError) as e:
        Vocab.from_dict(bad)
    assert "Vocab.to_dict()" in one_line(e)


# --------------------------------------------------------------------------- minibatch iterators

# With positions_corpus, a token id is its position, so X[b, t] is where that token sits in the corpus.


@pytest.mark.parametrize("iterator", ITERATORS)
@pytest.mark.parametrize("B,T,L", [(1, 1, 2), (2, 3, 50), (4, 5, 103), (3, 1, 20), (1, 7, 64), (32, 35, 10000)])
def test_shapes_dtype_backend_and_shift(xp, iterator, B, T, L):
    batches = list(iterator(positions_corpus(L), B, T, rng=np.random.default_rng(1)))
    assert len(batches) >= 1
    for X, Y in batches:
        assert isinstance(X, xp.ndarray) and isinstance(Y, xp.ndarray)
        assert X.shape == Y.shape == (B, T) and X.dtype == Y.dtype == xp.int64
        assert bool((Y == X + 1).all())  # Y is X shifted by one in the corpus


@pytest.mark.parametrize("use_random_iter", [False, True])
def test_batches_are_the_real_corpus_shifted_by_one(use_random_iter):
    corpus, _ = data.load_corpus("timemachine")
    iterator = seq_data_iter_random if use_random_iter else seq_data_iter_sequential
    # the same seed draws the same offset and order, so the positions run tells where each token came from
    real = epoch(iterator(corpus, 32, 35, rng=np.random.default_rng(7)))
    where = epoch(iterator(positions_corpus(len(corpus)), 32, 35, rng=np.random.default_rng(7)))
    assert len(real) == len(where) > 0
    for (X, Y), (pos, _) in zip(real, where):
        np.testing.assert_array_equal(X, corpus[pos])
        np.testing.assert_array_equal(Y, corpus[pos + 1])


def test_sequential_minibatches_continue_each_other():
    B, T, L = 4, 5, 211
    for seed in range(10):
        batches = epoch(seq_data_iter_sequential(positions_corpus(L), B, T, rng=np.random.default_rng(seed)))
        assert len(batches) >= 2
        for (X0, _), (X1, _) in zip(batches, batches[1:]):
            np.testing.assert_array_equal(X1[:, 0], X0[:, -1] + 1)  # row r resumes right after it stopped
        rows = np.concatenate([X for X, _ in batches], axis=1)  # (B, num_batches*T)
        assert (np.diff(rows, axis=1) == 1).all()  # each row is one contiguous stretch
        row_starts = rows[:, 0]
        assert len(set(np.diff(row_starts))) == 1  # rows are evenly spaced: equal-length rows
        assert 0 <= row_starts[0] < T


def test_sequential_coverage_bound_is_exact():
    """Tokens never used as input: the offset (< T), the remainder of splitting into B rows
    (1..B, since one token is kept back for the last target) and B row tails (< T each),
    so at most (T-1) + B + B*(T-1) = B*T + T - 1. L=14, B=2, T=3 reaches it at offset 2."""
    B, T, L = 2, 3, 14
    rng = np.random.default_rng(0)
    unused = []
    for _ in range(200):
        batches = epoch(seq_data_iter_sequential(positions_corpus(L), B, T, rng=rng))
        used = np.concatenate([X.ravel() for X, _ in batches])
        assert len(np.unique(used)) == len(used)  # no token is an input twice
        unused.append(L - len(used))
    assert max(unused) == B * T + T - 1 == 8
    # on a long corpus the same bound holds
    L = 1000
    for seed in range(30):
        batches = epoch(seq_data_iter_sequential(positions_corpus(L), 7, 9, rng=np.random.default_rng(seed)))
        assert L - sum(X.size for X, _ in batches) <= 7 * 9 + 9 - 1


def test_random_subsequences_do_not_overlap_and_share_the_offset():
    B, T, L = 3, 4, 150
    for seed in range(20):
        batches = epoch(seq_data_iter_random(positions_corpus(L), B, T, rng=np.random.default_rng(seed)))
        starts = np.concatenate([X[:, 0] for X, _ in batches])
        for X, _ in batches:
            assert (X == X[:, :1] + np.arange(T)).all()  # each row is a contiguous subsequence
        offset = starts.min() % T
        assert set(starts % T) == {offset}  # every start is offset + k*T ...
        assert len(set(starts)) == len(starts)  # ... with distinct k, so no two overlap
        num_subseqs = (L - offset - 1) // T
        assert len(batches) == num_subseqs // B
        assert starts.max() + T + 1 <= L  # the last target is still in the corpus


def test_random_iter_shuffles():
    batches = epoch(seq_data_iter_random(positions_corpus(2000), 4, 5, rng=np.random.default_rng(0)))
    starts = np.concatenate([X[:, 0] for X, _ in batches])
    assert not (np.diff(starts) > 0).all()


@pytest.mark.parametrize("iterator", ITERATORS)
def test_offset_is_below_num_steps(iterator):
    """d2l's sequential offset randint(0, T) can be T; ours is in [0, T) and takes every value.

    With B=1, T=4, L=40 every offset in [0, 4) leaves 9 subsequences and all of them are
    used, so the smallest start in an epoch is its offset (an offset of 4 would show as 4)."""
    B, T, L = 1, 4, 40
    rng = np.random.default_rng(3)
    offsets = set()
    for _ in range(200):
        batches = epoch(iterator(positions_corpus(L), B, T, rng=rng))
        assert len(batches) == 9
        offsets.add(int(min(X[0, 0] for X, _ in batches)))
    assert offsets == {0, 1, 2, 3}


@pytest.mark.parametrize("iterator", ITERATORS)
def test_same_seed_repeats_reused_generator_varies(iterator):
    corpus = positions_corpus(500)
    a = epoch(iterator(corpus, 4, 6, rng=np.random.default_rng(42)))
    b = epoch(iterator(corpus, 4, 6, rng=np.random.default_rng(42)))
    assert len(a) == len(b) and all((xa == xb).all() for (xa, _), (xb, _) in zip(a, b))
    rng = np.random.default_rng(42)
    firsts = [epoch(iterator(corpus, 4, 6, rng=rng))[0][0] for _ in range(8)]
    assert len({f.tobytes() for f in firsts}) > 1  # later epochs draw new offsets / orders


@pytest.mark.parametrize("use_random_iter", [False, True])
def test_one_host_to_device_copy_per_epoch(monkeypatch, use_random_iter):
    calls = []
    real_asarray = backend.asarray

    def counting_asarray(a, dtype=None):
        calls.append(np.shape(a))
        return real_asarray(a, dtype=dtype)

    monkeypatch.setattr(backend, "asarray", counting_asarray)
    iterator = seq_data_iter_random if use_random_iter else seq_data_iter_sequential
    batches = epoch(iterator(positions_corpus(5000), 8, 10, rng=np.random.default_rng(0)))
    assert len(batches) > 10
    assert len(calls) == 1 and calls[0] == (len(batches), 8, 11)  # the whole epoch's windows at once


# --------------------------------------------------------------------------- SeqDataLoader


@pytest.mark.parametrize("use_random_iter", [False, True])
@pytest.mark.parametrize("B,T,L", [(2, 3, 9), (2, 3, 50), (4, 5, 103), (3, 7, 100), (32, 35, 10000)])
def test_loader_len_is_exact(use_random_iter, B, T, L):
    loader = SeqDataLoader(positions_corpus(L), B, T, use_random_iter=use_random_iter)
    counts = {len(epoch(loader)) for _ in range(30)}
    assert counts == {len(loader)}
    assert len(loader) >= 1


@pytest.mark.parametrize("use_random_iter", [False, True])
def test_loader_len_is_the_minimum_over_offsets(use_random_iter):
    # here the plain iterator yields 3 batches at small offsets and 2 at large ones
    B, T, L = 2, 3, 19
    iterator = seq_data_iter_random if use_random_iter else seq_data_iter_sequential
    rng = np.random.default_rng(0)
    plain = {len(epoch(iterator(positions_corpus(L), B, T, rng=rng))) for _ in range(100)}
    loader = SeqDataLoader(positions_corpus(L), B, T, use_random_iter=use_random_iter)
    assert plain == {2, 3} and len(loader) == min(plain) == 2


@pytest.mark.parametrize("use_random_iter", [False, True])
def test_loader_delegates_with_its_rng(use_random_iter):
    corpus = positions_corpus(300)
    default = SeqDataLoader(corpus, 3, 4, use_random_iter=use_random_iter)
    seeded = SeqDataLoader(corpus, 3, 4, use_random_iter=use_random_iter, rng=np.random.default_rng(0))
    first, again = epoch(default), epoch(seeded)  # the default rng is default_rng(0)
    assert all((a == b).all() for (a, _), (b, _) in zip(first, again))
    iterator = seq_data_iter_random if use_random_iter else seq_data_iter_sequential
    direct = epoch(iterator(corpus, 3, 4, rng=np.random.default_rng(0)))[: len(default)]
    assert all((a == b).all() for (a, _), (b, _) in zip(first, direct))
    later = [epoch(default)[0][0].tobytes() for _ in range(8)]
    assert len(set(later)) > 1  # the loader keeps its generator, so epochs differ
