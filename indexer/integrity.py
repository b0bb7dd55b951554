"""Integrity of a database folder's files: checksums and stamps of derived files, and the one
sentence a damaged table, a full disk or a read-only folder becomes.

Every derived file (the FAISS index and its ids, the fitted ensemble and its image mean, the cached
text means) is stamped, in the JSON beside it, with what it was built from (the table's data
version and row count, a digest of the ids in the order the file holds them) and with its own size
and SHA-256 (:func:`file_checksum`). A reader compares the size on every status check (cheap) and
the SHA-256 when it loads the file (1.7 GB/s here; a verified load of the FAISS index takes about
twice a bare read: ``scripts/bench_integrity.py``); a mismatch is rebuilt (the FAISS index, a cache) or refused with
one sentence pointing at ``llm2loss check`` (the ensemble), never used. ``indexer.check`` verifies
the same stamps in full, together with every data file of the table.

Lance raises no typed errors: a truncated, deleted or zero-filled data file, or a truncated version
manifest, reaches Python as a ``RuntimeError``/``ValueError``/``OSError`` whose message names the
storage failure. :func:`storage_error` recognises those messages (and only those: a bad filter is
not damage) and :func:`write_error` the errno of a failed write (full disk, read-only folder).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import re
from collections.abc import Callable, Iterable
from itertools import islice
from pathlib import Path

import numpy as np

from indexer.errors import Unavailable

log = logging.getLogger(__name__)

CHUNK = 4 << 20

#: Messages with which Lance reports files it cannot read (a damaged table).
_DAMAGE = re.compile(
    r"LanceError\(IO\)|Not found: \S+\.(lance|manifest|txn|idx)\b|does not appear to be a Lance file"
    r"|failed to fill whole buffer|file size is too small|invalid magic|Corrupt", re.IGNORECASE)
_WRITE_ERRNOS = {errno.ENOSPC: "no space is left on the device", errno.EDQUOT: "the disk quota is exhausted",
                 errno.EROFS: "the file system is read-only", errno.EACCES: "permission to write is denied",
                 errno.EPERM: "permission to write is denied"}
_WRITE_TEXT = [(re.compile(r"No space left on device|os error 28", re.I), errno.ENOSPC),
               (re.compile(r"Disk quota exceeded|os error 122", re.I), errno.EDQUOT),
               (re.compile(r"Read-only file system|os error 30", re.I), errno.EROFS),
               (re.compile(r"Permission denied|os error 13", re.I), errno.EACCES)]


# ---- checksums and stamps ---------------------------------------------------------------------------
def file_checksum(path: str | os.PathLike) -> dict:
    """``{"bytes": size, "sha256": hex digest}`` of a file, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return {"bytes": os.path.getsize(path), "sha256": h.hexdigest()}


def size_problem(path: Path, expected: dict | None) -> str | None:
    """Why ``path`` is not the file stamped ``expected`` judging by its size alone (None if it may be)."""
    if expected is None:
        return f"{path.name} has no recorded checksum"
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return f"{path.name} is missing"
    if size != expected.get("bytes"):
        return f"{path.name} is {size:,} bytes but was {expected.get('bytes'):,} when written"
    return None


def checksum_problem(path: Path, expected: dict | None) -> str | None:
    """Why ``path`` is not the file stamped ``expected`` (size, then SHA-256); None when it is."""
    problem = size_problem(path, expected)
    if problem is not None:
        return problem
    try:
        actual = file_checksum(path)["sha256"]
    except OSError as e:
        return f"{path.name} cannot be read ({e.strerror or e})"
    if actual != expected.get("sha256"):
        return f"{path.name} differs from the file written (its SHA-256 changed)"
    return None


def ids_digest(ids: Iterable) -> str:
    """SHA-256 of a sequence of ids in its order (an array, a list or any iterable of str): two
    orders of the same ids differ. Streamed: each id's UTF-8 bytes, length-prefixed."""
    h = hashlib.sha256()
    it = iter(ids)
    while part := [str(i).encode() for i in islice(it, 65536)]:
        h.update(np.asarray([len(p) for p in part], dtype="<u4").tobytes())
        h.update(b"".join(part))
    return h.hexdigest()


def id_set_digest(ids) -> str:
    """SHA-256 of a set of ids, whatever their order (compaction may reorder a table's rows)."""
    return ids_digest(sorted(str(i) for i in ids))


# ---- cached arrays (rebuilt when their stamp or checksum does not match) ------------------------------
def _stamp_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def load_cached_array(path: Path, built_from: dict) -> np.ndarray | None:
    """The array cached at ``path`` when its stamp equals ``built_from`` and its checksum holds;
    otherwise None (the caller recomputes it), and a damaged cache file is removed."""
    import json

    stamp_path = _stamp_path(path)
    if not path.exists():
        return None
    try:
        stamp = json.loads(stamp_path.read_text())
    except (OSError, ValueError):
        stamp = None
    problem = "no stamp" if not isinstance(stamp, dict) else (
        "built from something else" if stamp.get("built_from") != built_from else checksum_problem(path, stamp.get("file")))
    if problem is None:
        try:
            return np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            problem = f"unreadable ({type(e).__name__})"
    log.info("cache %s not used (%s); recomputing it", path, problem)
    for p in (path, stamp_path):
        with contextlib.suppress(OSError):
            p.unlink(missing_ok=True)
    return None


def save_cached_array(path: Path, arr: np.ndarray, built_from: dict) -> None:
    """Cache ``arr`` at ``path`` (atomic), stamped with ``built_from`` and its checksum; a folder that
    cannot be written (read-only, full) only costs the cache."""
    from indexer.store import write_json_atomic

    try:
        atomic_write(path, lambda p: _save_npy(p, arr))
        write_json_atomic(_stamp_path(path), {"built_from": built_from, "file": file_checksum(path)})
    except OSError as e:
        log.debug("could not cache %s: %s", path, e)
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)  # a cache without its stamp would never be used


def _save_npy(path: str, arr: np.ndarray) -> None:
    with open(path, "wb") as f:  # a file object: np.save would append ".npy" to a bare temp name
        np.save(f, arr, allow_pickle=False)


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Write ``path`` through a temporary file in its folder and a rename; the temporary file is
    removed whatever happens (a full disk leaves nothing behind)."""
    import tempfile

    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# ---- errors as one sentence -----------------------------------------------------------------------
def write_errno(e: BaseException) -> int | None:
    """The errno of a failed write (full disk, read-only, no permission), from an OSError or from the
    message of a Lance / FAISS error; None for any other failure."""
    if isinstance(e, OSError) and e.errno in _WRITE_ERRNOS:
        return e.errno
    text = str(e)
    for pattern, code in _WRITE_TEXT:
        if pattern.search(text):
            return code
    return None


def write_error(e: BaseException, what: str, command: str | None, cleaned: bool = True,
                db_path: str | os.PathLike | None = None) -> Unavailable | None:
    """One sentence for a write of ``what`` that failed for lack of space or permission (None when
    ``e`` is another failure): what happened, that nothing was left half-written (``cleaned``: the
    caller made sure of it; otherwise ``check`` is named), how to rerun."""
    code = write_errno(e)
    if code is None:
        return None
    fix = "free some space" if code in (errno.ENOSPC, errno.EDQUOT) else "make it writable"
    rerun = f"run `llm2loss {command}` again" if command else "try again"
    if cleaned:
        return Unavailable(f"writing {what} failed: {_WRITE_ERRNOS[code]}; nothing was left half-written: "
                           f"{fix}, then {rerun}.")
    db = f" --db {Path(db_path).expanduser().resolve()}" if db_path else ""
    return Unavailable(f"writing {what} failed: {_WRITE_ERRNOS[code]}; {fix}, then {rerun} "
                       f"(`llm2loss check{db}` says whether anything was left damaged).")


def is_damage(e: BaseException) -> bool:
    """True when ``e`` is Lance (or FAISS) reporting a file it cannot read."""
    return write_errno(e) is None and bool(_DAMAGE.search(str(e)))


def storage_error(e: BaseException, db_path: str | os.PathLike | None) -> Unavailable | None:
    """One sentence for a damaged table met by any command (None when ``e`` is not damage)."""
    if not is_damage(e):
        return None
    where = f"the database {Path(db_path).expanduser().resolve()}" if db_path else "the database"
    detail = short_message(str(e))
    db = f" --db {Path(db_path).expanduser().resolve()}" if db_path else " --db DIR"
    return Unavailable(f"{where} could not be read ({detail}): its files are damaged; run `llm2loss check{db}` "
                       "to see what is damaged and how to repair it.")


def short_message(text: str) -> str:
    """Lance's message without its source location (", /rustc/...rs:12:5") and folded to one line."""
    text = re.sub(r",?\s*/\S+\.rs:\d+:\d+", "", text.replace("\n", " ")).strip()
    return text[:200]
