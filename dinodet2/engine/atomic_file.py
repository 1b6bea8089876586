"""Write a file so that a reader sees either the previous version or the complete new one.

The data go to a hidden temporary file in the same folder (``.<name>.partial-<pid>.tmp``: neither a
``.pth`` that Detectron2 / fvcore would list as a checkpoint nor ``last_checkpoint``), which is
flushed and fsync'ed, renamed over the final name with ``os.replace`` (atomic on POSIX and
Windows) and made durable by fsync'ing the folder. A process killed mid-write leaves only the
temporary file; :func:`remove_interrupted_writes` deletes such leftovers.
"""
import logging
import os
import re
from typing import BinaryIO, Callable, List

__all__ = ["remove_interrupted_writes", "write_atomically"]

logger = logging.getLogger(__name__)

_TEMPORARY_NAME = re.compile(r"^\..+\.partial-\d+\.tmp$")


def _temporary_path(path: str) -> str:
    folder, name = os.path.split(path)
    return os.path.join(folder, f".{name}.partial-{os.getpid()}.tmp")


def _fsync_folder(folder: str) -> None:
    """Make a rename in ``folder`` durable. Some file systems cannot fsync a folder; the file
    itself is already on disk then, so that is logged, not raised."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError as e:
        logger.debug("Cannot open %s to fsync it: %s", folder, e)
        return
    try:
        os.fsync(fd)
    except OSError as e:
        logger.debug("Cannot fsync folder %s: %s", folder, e)
    finally:
        os.close(fd)


def write_atomically(path: str, write: Callable[[BinaryIO], None]) -> None:
    """Call ``write(f)`` on a binary file that becomes ``path`` only once it is complete.

    If ``write`` (or anything up to the rename) raises, the temporary file is removed and
    ``path`` is left as it was.
    """
    temporary = _temporary_path(path)
    try:
        with open(temporary, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        try:
            os.remove(temporary)
        except OSError:
            pass
        raise
    _fsync_folder(os.path.dirname(os.path.abspath(path)))


def remove_interrupted_writes(folder: str) -> List[str]:
    """Delete the temporary files that interrupted :func:`write_atomically` calls left in
    ``folder``; returns their paths."""
    if not os.path.isdir(folder):
        return []
    removed = []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if _TEMPORARY_NAME.match(name) and os.path.isfile(path):
            os.remove(path)
            removed.append(path)
            logger.info("Removed %s, left by an interrupted checkpoint write.", path)
    return removed
