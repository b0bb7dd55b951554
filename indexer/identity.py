"""What identifies an indexed image file, recorded at index time and checked before it is served or exported.

A path is not a file: after ``index``, a symlink among the images can be re-pointed (at
``secret.txt``), or a file replaced by another under the same name. So ``index`` records, per row,
the file it read (:data:`~indexer.schema.IDENTITY_COLUMNS`): its real path (symlinks resolved), its
size, its modification time (ns) and the SHA-256 of its bytes. ``serve`` (the image route, the file
route, the page's galleries) and ``export`` hand out a file only when it still has that identity
(:func:`verify`): the real path is the recorded one, and the bytes hash to the recorded digest (size
and modification time are compared first, so a changed file is refused without reading it). A file
that changed in place is refused even when its size and time were forged back.

Cost: one extra read of each image at index time, from the page cache the decoder just filled;
SHA-256 runs at about 1.5 GB/s (``scripts/bench_identity.py``, BENCHMARKS.md "issue 25": 0.024 ms
for a 64 px world PNG, 1.6% of decoding it and running the tiny CLIP on it; 3.3 ms for a 5 MiB
photo). At serving, one read and hash of the file sent (0.023 ms for a world PNG).

Tables indexed before these columns existed have no identity: their files are checked by path only
(real path an indexed image's, as before), and ``serve`` says so once in its log; re-index into a
new ``--db`` to record identities.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import pyarrow as pa

from indexer import schema as S

#: Files are hashed in blocks of this many bytes.
BLOCK = 1 << 20


@dataclass(frozen=True)
class FileIdentity:
    """``real``: the real path (str); ``size``: bytes; ``mtime_ns``: modification time; ``sha256``: hex."""

    real: str
    size: int
    mtime_ns: int
    sha256: str

    @classmethod
    def from_row(cls, row: dict) -> FileIdentity | None:
        """The identity recorded in a table row (a dict with the identity columns), None without one."""
        values = [row.get(c) for c in S.IDENTITY_COLUMNS]
        if any(v is None for v in values):
            return None
        return cls(str(values[0]), int(values[1]), int(values[2]), str(values[3]))


def _digest(f) -> str:
    h = hashlib.sha256()
    while block := f.read(BLOCK):
        h.update(block)
    return h.hexdigest()


def read_identity(path: str | os.PathLike) -> FileIdentity | None:
    """The identity of the file at ``path`` now (one read), None when it is not a readable regular file."""
    try:
        real = os.path.realpath(path)
        with open(real, "rb") as f:
            st = os.fstat(f.fileno())
            if not _is_regular(st):
                return None
            return FileIdentity(real, st.st_size, st.st_mtime_ns, _digest(f))
    except OSError:
        return None


def _is_regular(st: os.stat_result) -> bool:
    import stat

    return stat.S_ISREG(st.st_mode)


def identity_columns(paths: list[str]) -> dict[str, pa.Array]:
    """The identity columns for image ``paths`` (nulls where a file cannot be read)."""
    ids = [read_identity(p) for p in paths]
    return {
        S.IMAGE_REAL: pa.array([i.real if i else None for i in ids], pa.string()),
        S.IMAGE_BYTES: pa.array([i.size if i else None for i in ids], pa.int64()),
        S.IMAGE_MTIME_NS: pa.array([i.mtime_ns if i else None for i in ids], pa.int64()),
        S.IMAGE_SHA256: pa.array([i.sha256 if i else None for i in ids], pa.string()),
    }


class FileChanged(Exception):
    """The file at a path is no longer the one indexed; ``str(e)`` says how (a clause)."""


def verify(path: str | os.PathLike, recorded: FileIdentity, read: bool = False) -> str | bytes:
    """The real path of ``path`` (or, with ``read``, its bytes, read once: what is checked is what
    is sent) when it is still the file ``recorded``; else :class:`FileChanged`."""
    real = os.path.realpath(path)
    if real != recorded.real:
        raise FileChanged(f"{path} now leads to {real}, not to the indexed {recorded.real}")
    try:
        with open(real, "rb") as f:
            st = os.fstat(f.fileno())
            if not _is_regular(st):
                raise FileChanged(f"{real} is no longer a regular file")
            if st.st_size != recorded.size or st.st_mtime_ns != recorded.mtime_ns:
                raise FileChanged(f"{real} was modified after it was indexed (size or time differ)")
            if read:
                data = f.read(recorded.size + 1)
                digest = hashlib.sha256(data).hexdigest()
            else:
                digest = _digest(f)
    except FileNotFoundError:
        raise FileChanged(f"{real} no longer exists") from None
    except OSError as e:
        raise FileChanged(f"{real} cannot be read ({e.strerror or type(e).__name__})") from None
    if digest != recorded.sha256:
        raise FileChanged(f"{real} holds other bytes than when it was indexed")
    return data if read else real
