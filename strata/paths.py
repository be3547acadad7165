"""Where each store lives inside the data dir.

L2 can exist in several versions side by side (a shadow migration builds the
next one beside the live one): version 1 is ``l2/strata.db``, version N is
``l2/strata.vN.db``. The small pointer file ``l2/CURRENT`` names the live
version; it is replaced atomically (:func:`os.replace`) on cutover, so every
process that resolves :attr:`StorePaths.l2_db` sees either the old version or
the new one, never a mix. Without a pointer, version 1 is live.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from strata.errors import StoreError, UsageError


@dataclass(frozen=True)
class StorePaths:
    """The layout of a Strata data dir."""

    root: Path

    @property
    def l2_db(self) -> Path:
        """The SQLite file of the live L2: the version the pointer names.

        Read afresh on every access, so a long-lived process that resolves it
        per batch or per read follows a cutover.

        Raises:
            StoreError: the pointer file exists but cannot be read.
        """
        return self.l2_version_db(self.l2_live_version)

    @property
    def l2_pointer(self) -> Path:
        """The file naming the live L2 version."""
        return self.root / "l2" / "CURRENT"

    @property
    def l2_live_version(self) -> int:
        """The live L2 version: the pointer's, else 1.

        Raises:
            StoreError: the pointer file exists but cannot be read.
        """
        pointer = read_l2_pointer(self.l2_pointer)
        return pointer.version if pointer is not None else 1

    def l2_version_db(self, version: int) -> Path:
        """The SQLite file of one L2 version, live or not."""
        name = "strata.db" if version == 1 else f"strata.v{version}.db"
        return self.root / "l2" / name

    @property
    def jobs(self) -> Path:
        """State and reports of resumable jobs (backfills)."""
        return self.root / "jobs"

    @property
    def ledger(self) -> Path:
        """The ledger folder."""
        return self.root / "ledger"

    @property
    def l3(self) -> Path:
        """The L3 archive folder."""
        return self.root / "l3"

    @property
    def keys(self) -> Path:
        """The local keystore folder."""
        return self.root / "keys"

    @property
    def workers(self) -> Path:
        """State files of running workers, read by `strata status`."""
        return self.root / "workers"

    @property
    def store_id_file(self) -> Path:
        """The store's identity (see :func:`store_id`)."""
        return self.root / "store-id"


def require_data_dir(root: Path) -> None:
    """Refuse a data dir that is not there, for a command that works on an
    existing store: the records (and their keys) may be in the one meant,
    and a store or keystore of its own must not be started in its place.

    Raises:
        UsageError: ``root`` does not exist.
    """
    if not root.is_dir():
        raise UsageError(f"data dir {root} does not exist: check STRATA_DATA_DIR")


def store_id(paths: StorePaths, *, adopt: str | None = None) -> str:
    """The identity of the store in a data dir, made on first use.

    Workers of one store (one data dir, or one shared by a consumer group)
    share it; a rebuild into a fresh folder takes its source's (``adopt``), being
    a copy of the same store. Dead letters carry it, so each store honours
    its own decisions and not those of another store on the same topic (a
    mistyped data dir, a replica with a stale keystore).

    Raises:
        StoreError: the file cannot be read or written.
    """
    path = paths.store_id_file
    found = existing_store_id(paths)
    if found is not None:
        return found
    made = adopt or os.urandom(16).hex()
    try:
        paths.root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(
            "w", dir=paths.root, prefix=".store-id.", delete=False
        ) as tmp:
            tmp.write(made + "\n")
        try:
            # Linking fails if another process made it first: theirs stands.
            os.link(tmp.name, path)
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp.name)
        return _checked_store_id(path, path.read_text())
    except OSError as exc:
        raise StoreError(f"{path}: cannot be written: {exc.strerror}") from exc


def existing_store_id(paths: StorePaths) -> str | None:
    """The store id of a data dir, or None if it has none yet (never made).

    Raises:
        StoreError: the file is damaged or cannot be read.
    """
    path = paths.store_id_file
    try:
        return _checked_store_id(path, path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise StoreError(f"{path}: cannot be read: {exc}") from exc


def _checked_store_id(path: Path, text: str) -> str:
    value = text.strip()
    if len(value) != 32 or any(c not in "0123456789abcdef" for c in value):
        # A new identity would disown this store's dead-letter decisions.
        raise StoreError(
            f"{path}: damaged (expected 32 hex digits, got {value[:40]!r}): restore "
            "it from a copy of this data dir, or from a `strata dlq list --json` "
            "letter's store"
        )
    return value


@dataclass(frozen=True, slots=True)
class L2Pointer:
    """What ``l2/CURRENT`` says: the live version and the one it replaced."""

    version: int
    previous: int | None = None
    switched_ms: int = 0

    def to_json(self) -> str:
        """The file's content."""
        return json.dumps(
            {
                "version": self.version,
                "previous": self.previous,
                "switched_ms": self.switched_ms,
            },
            sort_keys=True,
        )


def read_l2_pointer(path: Path) -> L2Pointer | None:
    """Read the pointer file; None when there is none.

    Raises:
        StoreError: it exists but is unreadable or malformed. Falling back to
            version 1 instead would silently serve a stale projection.
    """
    # Resolved once per batch and per read: reread only when the file changes.
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StoreError(f"L2 pointer {path}: {exc.strerror or exc}") from exc
    stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
    known = _POINTERS.get(path)
    if known is not None and known[0] == stamp:
        return known[1]
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StoreError(f"L2 pointer {path}: {exc.strerror or exc}") from exc
    pointer = _parse_pointer(path, raw)
    if len(_POINTERS) > 64:
        _POINTERS.clear()
    _POINTERS[path] = (stamp, pointer)
    return pointer


_POINTERS: dict[Path, tuple[tuple[int, int, int], L2Pointer]] = {}


def _parse_pointer(path: Path, raw: str) -> L2Pointer:
    try:
        doc = json.loads(raw)
        version = doc["version"]
        previous = doc.get("previous")
        switched_ms = doc.get("switched_ms", 0)
    except (ValueError, TypeError, KeyError) as exc:
        raise StoreError(f"L2 pointer {path}: not a pointer file: {exc}") from exc
    if not isinstance(version, int) or version < 1:
        raise StoreError(f"L2 pointer {path}: field version is {version!r}")
    if previous is not None and (not isinstance(previous, int) or previous < 1):
        raise StoreError(f"L2 pointer {path}: field previous is {previous!r}")
    return L2Pointer(version, previous, int(switched_ms))


def write_l2_pointer(path: Path, pointer: L2Pointer) -> None:
    """Replace the pointer file atomically and durably.

    The new content goes to a temporary file in the same folder, is synced,
    and is renamed over the old one; the folder is synced so the rename
    survives a power cut.

    Raises:
        StoreError: the file cannot be written; the old pointer stays.
    """
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".CURRENT.")
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(pointer.to_json() + "\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
        tmp = None
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        raise StoreError(f"L2 pointer {path}: cannot be written: {exc}") from exc
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
