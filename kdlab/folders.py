"""The folders the lab writes to: proven writable before any work, never left behind empty."""
from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

from kdlab.errors import KdlabError


def writable_folder(folder: str | Path, option: str) -> Path:
    """`folder`, made if missing and proven writable, or an error that names `option` to change."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as err:
        raise KdlabError(f"cannot write to {folder} ({err.strerror or err}); make it writable, "
                         f"or choose another {option}.") from None
    return folder


@contextlib.contextmanager
def no_empty_folders_left(folder: str | Path):
    """Remove the folders on the way to `folder` that the block made and left empty.

    A run that fails before writing anything (no data, no weights, bad settings) then leaves
    no trace; a folder with anything in it is kept.
    """
    made = [path for path in (Path(folder), *Path(folder).parents) if not path.exists()]
    try:
        yield
    finally:
        for path in made:   # innermost first
            with contextlib.suppress(OSError):   # not empty: something was written there
                path.rmdir()
