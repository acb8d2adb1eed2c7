"""Tests of npyrnn.data.corpus: corpus files and downloads, d2l preprocessing, load_corpus.

No test reaches the internet: every test uses conftest's `no_internet` fixture, which points
every download source at a closed port on 127.0.0.1, and the download tests serve files from a
local http.server. The Time Machine comes from NPYRNN_DATA_DIR (conftest.py defaults it to
../shared/data). Download sources are replaced where the download reads them,
`npyrnn.data.corpus.SOURCES`.
"""

import hashlib
import logging
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from conftest import closed_port_url, one_line, skip_unless_installed

from npyrnn import data
from npyrnn.data import DataError
from npyrnn.data import batches, vocab
from npyrnn.data import corpus as corpus_module

pytestmark = pytest.mark.usefixtures("no_internet")
SHA1 = data.TIMEMACHINE_SHA1


# --------------------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="session")
def good_bytes():
    """The verified Time Machine, read from NPYRNN_DATA_DIR."""
    path = Path(os.environ.get(data.DATA_DIR_ENV, "")) / data.TIMEMACHINE_FILENAME
    if not path.is_file():
        pytest.fail(f"tests need {path}: set NPYRNN_DATA_DIR to a folder with the verified timemachine.txt")
    return path.read_bytes()


@pytest.fixture
def cache(tmp_path):
    """The cache dir that conftest's no_internet set (not created yet)."""
    skip_unless_installed("pooch", "requests", "platformdirs")
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
    skip_unless_installed("pooch", "requests", "platformdirs")
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


def write(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return path


# --------------------------------------------------------------------------- the package


def test_package_reexports_every_public_name():
    namespace = {}
    exec("from npyrnn.data import *", namespace)
    assert set(data.__all__) <= set(namespace)
    assert set(data.__all__) == {"DataError", *corpus_module.__all__, *vocab.__all__, *batches.__all__}
    for module in (corpus_module, vocab, batches):
        for name in module.__all__:
            assert getattr(data, name) is getattr(module, name), name
    for name in ("DATA_DIR_ENV", "CACHE_DIR_ENV", "URL_ENV"):
        assert getattr(data, name) == getattr(corpus_module, name)


def test_sources_replaced_on_the_package_reach_the_download(no_data_dir, monkeypatch, server):
    """`npyrnn.data.SOURCES` forwards to `npyrnn.data.corpus.SOURCES`, the list the download reads."""
    monkeypatch.setattr(data, "SOURCES", [server.url("/missing"), server.url("/good")])
    assert corpus_module.SOURCES == [server.url("/missing"), server.url("/good")] and "SOURCES" in dir(data)
    assert sha1_of(data.timemachine_path()) == SHA1
    assert server.requests == ["/missing", "/good"]


def test_local_corpus_loads_without_the_download_packages():
    """pooch, requests and platformdirs are imported only to download or to find the cache."""
    code = (
        "import sys\n"
        "for name in ('pooch', 'requests', 'platformdirs'): sys.modules[name] = None  # importing them fails\n"
        "from npyrnn.data import load_corpus\n"
        "ids, vocab = load_corpus('timemachine')\n"
        "print(len(ids), len(vocab))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ))
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["10000", "28"]


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


# --------------------------------------------------------------------------- The Time Machine: local copies


def test_timemachine_from_data_dir(good_bytes, server, monkeypatch, cache):
    monkeypatch.setattr(corpus_module, "SOURCES", [server.url("/good")])
    path = data.timemachine_path()
    assert path == Path(os.environ[data.DATA_DIR_ENV]) / "timemachine.txt"
    assert server.requests == [] and listing(cache) == []


def test_wrong_file_in_data_dir_is_an_error(tmp_path, monkeypatch, server):
    bad_dir = tmp_path / "data"
    bad_dir.mkdir()
    write(bad_dir, "timemachine.txt", "not the book")
    monkeypatch.setenv(data.DATA_DIR_ENV, str(bad_dir))
    monkeypatch.setattr(corpus_module, "SOURCES", [server.url("/good")])
    with pytest.raises(DataError) as e:
        data.timemachine_path()
    msg = one_line(e)
    assert str(bad_dir / "timemachine.txt") in msg and f"expected {SHA1}" in msg and "NPYRNN_DATA_DIR" in msg
    assert server.requests == []  # a wrong file is reported, not silently bypassed


def test_cache_dir_from_env_and_platformdirs(monkeypatch, tmp_path):
    skip_unless_installed("platformdirs")
    import platformdirs

    assert data.cache_dir() == tmp_path / "cache"
    monkeypatch.delenv(data.CACHE_DIR_ENV)
    assert data.cache_dir() == Path(platformdirs.user_cache_dir("npyrnn"))


def test_no_download_when_told_not_to(no_data_dir, server, monkeypatch, cache):
    monkeypatch.setattr(corpus_module, "SOURCES", [server.url("/good")])
    with pytest.raises(DataError) as e:
        data.timemachine_path(download=False)
    msg = one_line(e)
    assert "not in NPYRNN_DATA_DIR or the cache" in msg and SHA1 in msg and "--corpus PATH" in msg
    assert server.requests == []


# --------------------------------------------------------------------------- The Time Machine: downloads


def test_download_into_cache_then_reuse(no_data_dir, server, monkeypatch, cache):
    monkeypatch.setattr(corpus_module, "SOURCES", [server.url("/good")])
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
    monkeypatch.setattr(corpus_module, "SOURCES", [server.url("/corrupt")])
    with pytest.raises(DataError) as e:
        data.timemachine_path()
    msg = one_line(e)
    assert "/corrupt: sha1 mismatch" in msg and "--corpus PATH" in msg
    assert server.requests == ["/corrupt"]
    assert listing(cache) == []  # neither timemachine.txt nor a stray temporary file


def test_download_falls_back_after_404(no_data_dir, monkeypatch, server, cache):
    monkeypatch.setattr(corpus_module, "SOURCES", [server.url("/missing"), server.url("/good")])
    path = data.timemachine_path()
    assert server.requests == ["/missing", "/good"]
    assert sha1_of(path) == SHA1 and listing(cache) == ["timemachine.txt"]


def test_download_falls_back_after_corrupt_source(no_data_dir, monkeypatch, server, cache):
    monkeypatch.setattr(corpus_module, "SOURCES", [server.url("/corrupt"), server.url("/good")])
    assert sha1_of(data.timemachine_path()) == SHA1
    assert server.requests == ["/corrupt", "/good"] and listing(cache) == ["timemachine.txt"]


def test_env_urls_are_tried_first(no_data_dir, monkeypatch, server):
    monkeypatch.setattr(corpus_module, "SOURCES", [server.url("/never")])
    monkeypatch.setenv(data.URL_ENV, f"{server.url('/missing')} ,{server.url('/good')}")
    assert sha1_of(data.timemachine_path()) == SHA1
    assert server.requests == ["/missing", "/good"]


def test_all_sources_unreachable(no_data_dir, monkeypatch, cache):
    dead = closed_port_url()
    monkeypatch.setattr(corpus_module, "SOURCES", [dead])
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
    monkeypatch.setattr(corpus_module, "SOURCES", [server.url("/good")])
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
