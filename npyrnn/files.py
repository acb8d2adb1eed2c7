"""Atomic file writes: a reader sees the old files or the new ones, never half of them."""

import os
import shutil
import tempfile
from pathlib import Path


def _read_umask():
    """The process umask, read once (setting it to read it is not thread-safe, so do it at import)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def _write_synced(path, data):
    """Create ``path`` with ``data``, flushed to disk, with the usual file mode."""
    with open(path, "xb") as f:
        os.fchmod(f.fileno(), 0o666 & ~_UMASK)
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_files_together(folder, files):
    """Write several files into ``folder`` so that none is replaced unless all could be written.

    Every file is first written and flushed into a staging folder inside
    ``folder``; only then are they renamed into place, one after another
    (a rename within one file system is atomic and needs no space). A failure
    or an interrupt while writing leaves ``folder`` as it was, and removes it
    again if this call created it.

    Parameters
    ----------
    folder : str or Path
        Created with its parents when missing.
    files : dict of str to bytes
        File name (no directories) to content.
    """
    folder = Path(folder)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=folder))
    try:
        for name, data in files.items():
            _write_synced(staging / name, data)
        for name in files:
            os.replace(staging / name, folder / name)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created and not any(p for p in folder.iterdir()):
            folder.rmdir()
        raise
    staging.rmdir()


def atomic_write_bytes(path, data):
    """Write ``data`` to ``path`` so that a reader sees the old file or the new one, never half of one.

    Parameters
    ----------
    path : str or Path
        Target; its directory must exist. An existing file is replaced only
        once the new content is completely on disk.
    data : bytes
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(2, "No such directory", str(path.parent))
    write_files_together(path.parent, {path.name: data})
