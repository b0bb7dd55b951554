"""Named selections: curated sets of sample ids kept in the database, grown over days, exported once.

Stored in ``DIR/selections.json`` as ``{"name": [id, ...]}`` (ids in the order they were added, no
duplicates). Every change is a read-modify-write under an exclusive lock on ``selections.json.lock``
and an atomic replace, so the web UI and the CLI can edit the same database without losing changes.
"""

from __future__ import annotations

import fcntl
import json
import re
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path

from indexer import schema as S
from indexer.errors import UserError
from indexer.integrity import write_error
from indexer.store import Database, write_json_atomic

#: A selection name: 1-100 letters, digits, spaces, '.', '_' or '-', starting with a letter or digit,
#: not ending in a space. One rule for the CLI, the API and the page: a name is stored exactly as
#: given or refused, never quietly changed (" lead" and "lead\n" are refused, not stored as "lead").
_NAME = re.compile(r"\w(?:[\w .\-]{0,98}[\w.\-])?")


def _check_name(name: str | None) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        edge = " (it starts or ends with a space or holds a control character)" if isinstance(name, str) and name and (
            name != name.strip() or any(not c.isprintable() for c in name)) else ""
        raise UserError(f"selection name {name!r} is not valid{edge}; use 1-100 letters, digits, spaces, '.', '_' "
                        "or '-', starting with a letter, digit or '_' and not ending in a space.")
    return name


def read_ids_file(path: str | Path) -> list[str]:
    """Ids from a text file, one per line (blank lines and surrounding spaces ignored)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"ids file {p} does not exist; pass a text file with one sample id per line.")
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"ids file {p} is not UTF-8 text (byte {e.start} is 0x{e.object[e.start]:02x}); pass a text "
                        "file with one sample id per line.") from None
    except OSError as e:
        raise UserError(f"ids file {p} cannot be read ({e.strerror or e}); pass a readable text file.") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


class Selections:
    """The named selections of one database (``db``: a folder or :class:`Database`)."""

    def __init__(self, db):
        self.db = db if isinstance(db, Database) else Database(db)
        self.path = self.db.selections_path

    @contextmanager
    def _locked(self):
        """Hold the selections' lock for a read-modify-write; a folder that cannot be written (read
        only, full) is one sentence (:class:`~indexer.errors.Unavailable`), the file left as it was."""
        try:
            lock = open(self.path.with_name(self.path.name + ".lock"), "w")  # noqa: SIM115 -- closed below
        except OSError as e:
            raise self._write_failed(e) from None
        with lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            except OSError as e:  # write_json_atomic removes its temporary file
                raise self._write_failed(e) from None
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _write_failed(self, e: OSError) -> Exception:
        return write_error(e, f"the selections of the database {self.db.path}", None) or e

    def all(self) -> dict[str, list[str]]:
        """Every selection: name -> ids, names sorted."""
        if not self.path.exists():
            return {}
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise UserError(f"{self.path} is not valid JSON ({type(e).__name__}); fix or delete it.") from e
        if not isinstance(data, dict):
            raise UserError(f"{self.path} holds a JSON {type(data).__name__}, not an object of selection name -> "
                            "list of ids; fix or delete it.")
        for name, ids in data.items():
            if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
                raise UserError(f"selection {name!r} in {self.path} is not a list of id strings; fix or delete it.")
        return {k: list(data[k]) for k in sorted(data)}

    def names(self) -> list[str]:
        return list(self.all())

    def get(self, name: str) -> list[str]:
        """The ids of selection ``name``; refuses an unknown name."""
        sels = self.all()
        if name not in sels:
            known = ", ".join(sels) or "none yet"
            raise UserError(f"no selection named {name!r} in {self.db.path} (known: {known}); "
                            "create it with `llm2loss select add NAME --ids FILE`.")
        return sels[name]

    def _check_ids(self, ids: list[str]) -> None:
        if not ids:
            return
        found = set(self.db.rows_by_id(ids, [S.ID]).column(S.ID).to_pylist())
        missing = [i for i in ids if i not in found]
        if missing:
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            raise UserError(f"{len(missing)} ids are not in {self.db.path} ({', '.join(missing[:3])}{more}); "
                            "add only ids of indexed samples.")

    def add(self, name: str, ids: Iterable[str]) -> int:
        """Add ``ids`` (validated against the table) to ``name``, creating it; returns its new size."""
        name = _check_name(name)
        ids = [str(i) for i in ids]
        self._check_ids(ids)
        with self._locked():
            sels = self.all()
            current = sels.setdefault(name, [])
            seen = set(current)
            for i in ids:
                if i not in seen:
                    current.append(i)
                    seen.add(i)
            write_json_atomic(self.path, sels)
        return len(current)

    def remove(self, name: str, ids: Iterable[str] | None = None) -> int:
        """Remove ``ids`` from ``name`` (the whole selection when ``ids`` is None); returns what is left."""
        with self._locked():
            self.get(name)
            sels = self.all()
            if ids is None:
                del sels[name]
                left = 0
            else:
                drop = {str(i) for i in ids}
                sels[name] = [i for i in sels[name] if i not in drop]
                left = len(sels[name])
            write_json_atomic(self.path, sels)
        return left
