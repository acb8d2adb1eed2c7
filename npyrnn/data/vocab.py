"""The vocabulary: tokens to integer ids and back (d2l's `Vocab`).

Host-side; `Vocab.to_tokens` also takes arrays from the active backend.
"""

import collections
import numbers

from npyrnn import backend
from npyrnn.errors import DataError

__all__ = ["Vocab"]


def _count_tokens(tokens):
    """Counter of a flat token list or of a list of token lists (d2l's `count_corpus`)."""
    if len(tokens) > 0 and isinstance(tokens[0], list):
        tokens = [token for line in tokens for token in line]
    return collections.Counter(tokens)


class Vocab:
    """Map tokens to integer ids and back (d2l's `Vocab`).

    Index 0 is `'<unk>'`, then come `reserved_tokens`, then every token
    that occurs at least `min_freq` times, most frequent first; ties keep the
    order in which the tokens first occur.

    Parameters
    ----------
    tokens : list of str or list of list of str, optional
        A flat token list or one token list per line.
    min_freq : int, default 0
        Tokens rarer than this are left out (and map to `<unk>`).
    reserved_tokens : list of str, optional
        Tokens placed right after `<unk>` whatever their frequency.

    Attributes
    ----------
    idx_to_token : list of str
        Token of each id; `len(vocab)` entries.
    token_to_idx : dict of str to int
    token_freqs : list of (str, int)
        Every counted token with its count, most frequent first (including
        those below `min_freq`).
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
            `{'idx_to_token': [str, ...], 'token_freqs': [[str, int], ...]}`
        """
        return {
            "idx_to_token": list(self.idx_to_token),
            "token_freqs": [[token, int(freq)] for token, freq in self._token_freqs],
        }

    @classmethod
    def from_dict(cls, d):
        """Rebuild a vocabulary from `to_dict`'s output (also after a JSON round trip).

        Parameters
        ----------
        d : dict
            Needs `'idx_to_token'` (a list starting with `'<unk>'`, no repeats);
            `'token_freqs'` is optional.

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
