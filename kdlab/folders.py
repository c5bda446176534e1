"""The folders the lab writes to: proven writable before any work, never left behind empty."""
from __future__ import annotations

import contextlib
import errno
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
        raise KdlabError(f"cannot write to {folder} ({err.strerror or err}). {storage_advice(err, option)}") from None
    return folder


# Google Drive's mount on Colab answers ENOTCONN ("Transport endpoint is not connected") or EIO
# when it has dropped, and EDQUOT when Drive's quota of writes or of storage is exceeded.
FULL = (errno.ENOSPC, errno.EFBIG)
DISCONNECTED = (errno.ENOTCONN, errno.EIO, errno.ESTALE)


def storage_advice(err: OSError, option: str) -> str:
    """What to do when reading or writing a folder failed with `err`; `option` sets the folder."""
    if err.errno in DISCONNECTED:
        return ("The drive stopped answering (on Colab: Google Drive disconnected): remount it, on Colab with "
                "drive.mount('/content/drive', force_remount=True), and run the same cell or command again; "
                "a run resumes after its last saved epoch.")
    if err.errno == errno.EDQUOT:
        return (f"The drive's quota is exceeded (on Google Drive: too many writes in a short time, or no "
                f"storage left): wait a while and run the same cell or command again, or choose a {option} "
                f"on the local disk.")
    if err.errno in FULL:
        return f"Free some space or choose another {option}, then run the same command again."
    return f"Make it writable or choose another {option}, then run the same command again."


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
