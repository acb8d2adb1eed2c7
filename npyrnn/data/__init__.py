"""Text corpora for language models: download, cache, tokenise, count, batch.

The pipeline follows d2l chapter 8 ("Text preprocessing", "Language models and
the dataset"):

```text
text file -> lines -> tokens -> Vocab -> corpus of token ids -> minibatches X, Y
```

One module per step, every public name importable from here:

- `npyrnn.data.corpus`: The Time Machine (sources, sha1, cache, download), reading
  and cleaning text files, tokens, `load_corpus`;
- `npyrnn.data.vocab`: `Vocab`;
- `npyrnn.data.batches`: `seq_data_iter_random`, `seq_data_iter_sequential`,
  `SeqDataLoader`.

Everything runs on the host with NumPy, except the minibatches, which the
iterators hand out on the active backend (`npyrnn.backend`). Bad input raises
`DataError` (a `ValueError`) whose message is one line: what is wrong, then how
to fix it.
"""

import sys
import types

from npyrnn.data import corpus
from npyrnn.data.batches import SeqDataLoader, seq_data_iter_random, seq_data_iter_sequential
from npyrnn.data.corpus import (  # and, outside __all__ as before, the environment variables' names
    CACHE_DIR_ENV,
    DATA_DIR_ENV,
    TIMEMACHINE_FILENAME,
    TIMEMACHINE_SHA1,
    TIMEMACHINE_SIZE,
    TOKEN_KINDS,
    URL_ENV,
    MAX_CORPUS_BYTES,
    cache_dir,
    clean_text,
    load_corpus,
    read_lines,
    read_text,
    read_time_machine,
    strip_gutenberg,
    timemachine_path,
    tokenize,
)
from npyrnn.data.vocab import Vocab
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
    "clean_text",
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


class _DataPackage(types.ModuleType):
    """This package, with `SOURCES` forwarded to `npyrnn.data.corpus`, where the download reads it.

    A plain re-export would be a second name for the list: assigning a new list to
    `npyrnn.data.SOURCES` would then leave the download's sources unchanged.
    """

    @property
    def SOURCES(self):  # noqa: N802 (the constant's name)
        return corpus.SOURCES

    @SOURCES.setter
    def SOURCES(self, value):  # noqa: N802
        corpus.SOURCES = value

    def __dir__(self):
        return sorted({*super().__dir__(), "SOURCES"})


sys.modules[__name__].__class__ = _DataPackage
