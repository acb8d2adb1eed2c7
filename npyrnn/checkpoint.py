"""Save and load language models without pickle (safetensors).

A checkpoint is one `.safetensors` file: the parameters under their state-dict
names (`rnn.weight_ih_l0`, ..., `linear.bias`) as host arrays, and in the
header's string metadata the model config, the vocabulary and the training
settings as JSON. Nothing in it can execute code when loaded.

A training checkpoint (`OUT/checkpoint.safetensors`, written by `npyrnn train`
during a run) is the same file with more: tensors named `trainer.*` and
`optimizer.*` (the carried state, running sums, optimiser buffers) and a
`training` metadata entry (epoch, metrics so far, every random generator's
state, the position inside the epoch). `load_checkpoint` reads either kind as a
model; `load_training_checkpoint` also returns the rest.

Writing is atomic: the bytes go to a temporary file in the same directory,
are flushed to disk, and then renamed over the target, so a crash never leaves
a half-written checkpoint. A `sha256` metadata entry covers every tensor and
every other metadata entry, so a file damaged later fails to load rather than
loading different weights. Loading checks the digest (when present: older
files have none), the format, the config, the tensor names and shapes, and
says exactly what is wrong with a bad file.
"""

import hashlib
import json
from pathlib import Path

import numpy

from npyrnn import backend
from npyrnn.data import Vocab
from npyrnn.errors import CheckpointError, UsageError
from npyrnn.files import atomic_write_bytes
from npyrnn.models import RNNLM

FORMAT = "npyrnn.rnnlm"
FORMAT_VERSION = "1"


TRAINING_PREFIXES = ("trainer.", "optimizer.")
DIGEST_KEY = "sha256"


def _digest(tensors, metadata):
    """sha256 of every tensor (name, dtype, shape, bytes) and every metadata entry but the digest itself."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        array = numpy.ascontiguousarray(tensors[name])
        h.update(json.dumps([name, array.dtype.str, list(array.shape)]).encode())
        h.update(array.tobytes())
    for key in sorted(k for k in metadata if k != DIGEST_KEY):
        h.update(json.dumps([key, metadata[key]]).encode())
    return h.hexdigest()


def require_safetensors(what):
    """Raise a one-line `UsageError` when the optional-at-import safetensors package is missing.

    Parameters
    ----------
    what : str
        What needs it, for the message (e.g. ``'npyrnn train writes its checkpoints'``).
    """
    try:
        import safetensors  # noqa: F401
    except ImportError:
        raise UsageError(f"{what} in the safetensors format, but safetensors is not installed; "
                         "pip install safetensors") from None


def checkpoint_bytes(model, vocab, extra=None, training=None):
    """The bytes of a checkpoint of `model` and `vocab` (what `save_checkpoint` writes).

    Parameters
    ----------
    model : RNNLM
    vocab : Vocab
    extra : dict, optional
        JSON-serialisable settings kept in the metadata.
    training : (dict of arrays, dict), optional
        For a training checkpoint: tensors whose names start with `trainer.` or
        `optimizer.`, and JSON-serialisable metadata.
    """
    tensors = {k: numpy.ascontiguousarray(backend.to_numpy(v)) for k, v in model.state_dict().items()}
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": json.dumps(model.config),
        "vocab": json.dumps(vocab.to_dict()),
        "extra": json.dumps(extra or {}),
    }
    if training is not None:
        more, meta = training
        for name, value in more.items():
            if not name.startswith(TRAINING_PREFIXES) or name in tensors:
                raise ValueError(f"checkpoint_bytes: training tensor name {name!r} must start with {TRAINING_PREFIXES}")
            tensors[name] = numpy.ascontiguousarray(backend.to_numpy(value))
        metadata["training"] = json.dumps(meta, allow_nan=False)
    metadata[DIGEST_KEY] = _digest(tensors, metadata)  # a damaged file fails to load instead of loading wrong
    require_safetensors("checkpoint_bytes")
    from safetensors.numpy import save

    return save(tensors, metadata=metadata)


def save_checkpoint(path, model, vocab, extra=None):
    """Write `model`'s weights, config and `vocab` to a safetensors file, atomically.

    Parameters
    ----------
    path : str or Path
        Target file, conventionally ``model.safetensors``; its directory must exist.
    model : RNNLM
    vocab : Vocab
    extra : dict, optional
        JSON-serialisable information (training settings, token kind) kept in the metadata.
    """
    atomic_write_bytes(path, checkpoint_bytes(model, vocab, extra))


def _fail(path, what):
    raise CheckpointError(f"checkpoint {str(path)!r}: {what}")


# The safetensors dtypes numpy reads natively (npyrnn itself writes float weights and integer and
# float training state); BF16 and the FP8 kinds are refused before any tensor is read.
READABLE_DTYPES = frozenset({"F16", "F32", "F64", "I8", "I16", "I32", "I64", "U8", "U16", "U32", "U64", "BOOL"})


def _unreadable(path, exc):
    reason = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
    _fail(path, f"not a readable safetensors file ({reason}); was it truncated or overwritten?")


def load_checkpoint(path):
    """Read a checkpoint written by `save_checkpoint` (or a training checkpoint) onto the active backend.

    Parameters
    ----------
    path : str or Path

    Returns
    -------
    model : RNNLM
        Built from the stored config on the active backend (a file written on
        CuPy loads on NumPy and vice versa).
    vocab : Vocab
    extra : dict

    Raises
    ------
    CheckpointError
        One line naming the file and what is wrong: missing, not a safetensors
        file, content that does not match its stored sha256, not an npyrnn
        checkpoint, a bad config, tensors whose names or shapes do not match
        that config, or weights that are not finite.
    """
    model, vocab, extra, _, _ = load_training_checkpoint(path, require_training=False)
    return model, vocab, extra


def load_training_checkpoint(path, require_training=True):
    """Read a training checkpoint: the model as `load_checkpoint` does, and what training needs to go on.

    Returns
    -------
    model, vocab, extra
        As `load_checkpoint`.
    training_tensors : dict of str to numpy array
        The `trainer.*` and `optimizer.*` tensors (host arrays).
    training : dict or None
        The `training` metadata; None for a model file (allowed only when
        `require_training` is False).
    """
    path = Path(path)
    if path.is_dir():
        _fail(path, "is a directory; pass the model.safetensors file inside it")
    if not path.exists():
        _fail(path, "no such file; pass the model.safetensors written by `npyrnn train --out DIR`")
    if not path.is_file():
        _fail(path, "not a regular file; pass the model.safetensors written by `npyrnn train --out DIR`")
    require_safetensors(f"reading {str(path)!r}")
    from safetensors import SafetensorError, safe_open
    from safetensors.numpy import load_file

    try:
        with safe_open(str(path), framework="numpy") as f:
            metadata = f.metadata() or {}
            stored = {name: f.get_slice(name).get_dtype() for name in f.keys()}
    except (SafetensorError, OSError, ValueError, TypeError) as exc:
        _unreadable(path, exc)
    # Checked on the header, not on what numpy returns: once ml_dtypes is imported (JAX and others
    # import it), numpy reads BF16 and FP8 as its own dtypes, and the same file would load.
    odd = sorted(f"{name} ({dtype})" for name, dtype in stored.items() if dtype not in READABLE_DTYPES)
    if odd:
        _fail(path, f"holds tensors of a dtype npyrnn does not read: {', '.join(odd)}; convert them "
                    "to F32 or F64 before loading")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, TypeError) as exc:
        _unreadable(path, exc)
    if DIGEST_KEY in metadata and metadata[DIGEST_KEY] != _digest(tensors, metadata):  # older files have none
        _fail(path, "damaged: its content does not match the sha256 stored in it (a changed or corrupted file); "
                    "use another copy or train again")
    if metadata.get("format") != FORMAT:
        _fail(path, f"not an npyrnn language-model checkpoint (format {metadata.get('format')!r}, expected {FORMAT!r})")
    if metadata.get("format_version") != FORMAT_VERSION:
        _fail(path, f"format version {metadata.get('format_version')!r} is not supported (this npyrnn reads {FORMAT_VERSION!r})")
    try:
        config = json.loads(metadata["config"])
        vocab = Vocab.from_dict(json.loads(metadata["vocab"]))
        extra = json.loads(metadata.get("extra", "{}"))
    except (KeyError, ValueError, TypeError) as exc:
        _fail(path, f"damaged metadata ({exc.__class__.__name__}: {exc})")
    training = None
    if "training" in metadata:
        try:
            training = json.loads(metadata["training"])
        except ValueError as exc:
            _fail(path, f"damaged training metadata ({exc})")
        if not isinstance(training, dict):
            _fail(path, "damaged training metadata (not a JSON object)")
    elif require_training:
        _fail(path, "holds a model but no training state; resume needs the checkpoint.safetensors of a run folder")
    for key, value in (("config", config), ("extra", extra)):
        if not isinstance(value, dict):
            _fail(path, f"damaged metadata ({key!r} is a JSON {type(value).__name__}, expected an object)")
    try:
        model = RNNLM(**config)
    except (TypeError, ValueError) as exc:
        _fail(path, f"bad model config {config!r} ({exc})")
    if len(vocab) != model.vocab_size:
        _fail(path, f"vocabulary has {len(vocab)} tokens but the model expects vocab_size={model.vocab_size}")
    more = {k: tensors.pop(k) for k in list(tensors) if training is not None and k.startswith(TRAINING_PREFIXES)}
    bad = [k for k, v in tensors.items() if v.dtype.kind == "f" and not numpy.isfinite(v).all()]
    if bad:
        _fail(path, f"weights are not finite (nan or inf) in {', '.join(bad)}; the run diverged before this file "
                    "was written: use an earlier checkpoint or train again with a lower --lr")
    try:
        model.load_state_dict(tensors)
    except ValueError as exc:
        _fail(path, f"tensors do not match the stored config: {exc}")
    return model, vocab, extra, more, training
