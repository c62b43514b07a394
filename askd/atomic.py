"""Atomic file writes: ``replacing(path)`` yields a temporary file beside ``path`` and renames it over
``path`` only when the block ends without an exception, so a reader or a crash sees either the old file
or the complete new one, never half of it.

Used for checkpoints, verification .bin files, ONNX models and RecordIO packs (three files that change
together: ``askd.data.pack`` nests three ``replacing`` blocks so that they are renamed in a fixed order).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def replacing(path: str | Path, make_parents: bool = True) -> Iterator[Path]:
    """Yield a new empty temporary file beside ``path``; on success fsync it and rename it over ``path``,
    on any exception (KeyboardInterrupt too) delete it.

    The temporary file is created with mode 0o666 less the umask, as any new file, not mkstemp's owner-only
    0o600: models and data are meant to be shared. ``make_parents``: create ``path``'s folder if missing
    (else FileNotFoundError). Beside ``path`` so that the rename stays on one filesystem.
    """
    path = Path(path)
    if make_parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    elif not path.parent.is_dir():
        raise FileNotFoundError(f"output folder {str(path.parent)!r} does not exist")
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
