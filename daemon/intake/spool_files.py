"""The spool directory's file operations. Every function here blocks: the spool
component calls them through `anyio.to_thread`, never on the loop.

Layout under the spool `dir`: new files arrive in `dir` itself; a claim renames one
into `processing/` (atomic on one filesystem, so exactly one claim owns a file); it
ends in `done/` or `failed/`, with `out/<name>.json` (the job's outcome) and, in
`failed/`, `<name>.reason`. Names are used only as path components, never parsed or
passed to a shell, so newlines and undecodable bytes are harmless.
"""

from __future__ import annotations

import contextlib
import fcntl
import fnmatch
import hashlib
import os
import stat
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

SUBDIRS = ("processing", "done", "failed", "out")
LOCK_NAME = ".vigil-spool.lock"
TMP_PREFIX = ".tmp-"
NAME_MAX = 255  # bytes in one path component on common filesystems


class SpoolLocked(Exception):
    """Another daemon owns this spool directory."""


class Sig(NamedTuple):
    """One version of a file: a rename keeps it, a write changes it."""

    ino: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> Sig:
        return cls(st.st_ino, st.st_size, st.st_mtime_ns)


Kind = Literal["file", "symlink", "dir", "other"]


class Found(NamedTuple):
    name: str
    kind: Kind
    sig: Sig


class Text(NamedTuple):
    text: str


class Reject(NamedTuple):
    reason: str


class Changed(NamedTuple):
    """Written to since it was claimed: still being written, so not ours yet."""


class Gone(NamedTuple):
    """Removed by someone else."""


Read = Text | Reject | Changed | Gone


@dataclass(frozen=True)
class Finish:
    """Where one file ends and what is written beside it."""

    name: str
    source: Literal["inbox", "processing"]
    ok: bool
    tag: str
    out_json: bytes | None = None
    reason: str | None = None


def shown(name: str) -> str:
    """The name as valid text (undecodable bytes as \\xNN): for JSON, logs and keys."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def identity_key(name: str, sig: Sig) -> str:
    """The idempotency key of one claimed file: the same after a crash and restart
    (a rename keeps inode, size and mtime), different for a new file of that name."""
    return f"spool:{sig.ino}:{sig.size}:{sig.mtime_ns}:{shown(name)}"


def tag_of(key: str) -> str:
    """A short stable suffix that keeps a second `a.txt` from overwriting the first."""
    return hashlib.blake2b(key.encode(), digest_size=6).hexdigest()


def fit(name: str, suffix: str) -> str:
    """`name + suffix`, the name shortened so the whole fits one path component."""
    raw, extra = os.fsencode(name), os.fsencode(suffix)
    return os.fsdecode(raw[: NAME_MAX - len(extra)] + extra)


@dataclass(frozen=True)
class Layout:
    inbox: Path

    def sub(self, name: str) -> Path:
        return self.inbox / name

    def prepare(self) -> int:
        """Create the subdirectories, take the spool lock (its fd is returned; closing
        it releases the lock), and remove temp files a crash left behind."""
        for name in SUBDIRS:
            self.sub(name).mkdir(parents=True, exist_ok=True)
        fd = os.open(self.inbox / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise SpoolLocked(f"another vigil daemon owns {self.inbox} ({LOCK_NAME})") from None
        for name in ("out", "failed"):
            with os.scandir(self.sub(name)) as entries:
                for entry in entries:
                    if entry.name.startswith(TMP_PREFIX):
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(entry.path)
        return fd


def scan(directory: Path, glob: str | None, limit: int) -> tuple[list[Found], int]:
    """Entries matching `glob` (all with None), hidden ones and our subdirectories
    aside; at most `limit` are stat'ed, the count covers them all."""
    found: list[Found] = []
    total = 0
    with os.scandir(directory) as entries:
        for entry in entries:
            name = entry.name
            if name.startswith("."):
                continue
            if glob is not None and (name in SUBDIRS or not fnmatch.fnmatchcase(name, glob)):
                continue
            total += 1
            if len(found) >= limit:
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                total -= 1
                continue
            kind: Kind = "other"
            if stat.S_ISREG(st.st_mode):
                kind = "file"
            elif stat.S_ISLNK(st.st_mode):
                kind = "symlink"
            elif stat.S_ISDIR(st.st_mode):
                kind = "dir"
            found.append(Found(name, kind, Sig.of(st)))
    return found, total


def claim(layout: Layout, names: list[str]) -> tuple[list[str], list[str]]:
    """Rename each into processing/; returns (claimed, errors). A name already in
    processing/ waits: renaming over it would destroy a file in flight. The spool
    lock makes this the only claimer, so the check cannot race."""
    claimed: list[str] = []
    errors: list[str] = []
    processing = layout.sub("processing")
    for name in names:
        if os.path.lexists(processing / name):
            continue
        try:
            os.rename(layout.inbox / name, processing / name)
        except FileNotFoundError:
            continue
        except OSError as exc:
            errors.append(f"cannot claim {shown(name)!r}: {exc.strerror}")
            continue
        claimed.append(name)
    return claimed, errors


def unclaim(layout: Layout, name: str) -> bool:
    """Give a file that is still being written back to the inbox to settle."""
    target = layout.inbox / name
    if os.path.lexists(target):
        return False
    try:
        os.rename(layout.sub("processing") / name, target)
    except OSError:
        return False
    return True


def read_text(path: Path, expected: Sig, max_bytes: int) -> Read:
    """The file's text if it is the version claimed, UTF-8, without NULs, not empty,
    and at most `max_bytes`. O_NONBLOCK: a FIFO slipped in must not hang a thread."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return Gone()
    except OSError as exc:
        return Reject(f"unreadable: {exc.strerror}")
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return Reject("not a regular file")
        if Sig.of(st) != expected:
            return Changed()
        if st.st_size > max_bytes:
            return Reject(
                f"too large: {st.st_size} bytes; the limit is {max_bytes} "
                "(intake.spool.max_file_bytes)"
            )
        chunks: list[bytes] = []
        left = max_bytes + 1
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        data = b"".join(chunks)
        if Sig.of(os.fstat(fd)) != expected or len(data) != st.st_size:
            return Changed()
    except OSError as exc:
        return Reject(f"unreadable: {exc.strerror}")
    finally:
        os.close(fd)
    if not data:
        return Reject("empty file")
    if b"\0" in data:
        return Reject("binary: contains NUL bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Reject(f"binary: not UTF-8 text (bad byte at offset {exc.start})")
    return Text(text.removeprefix("\ufeff"))


def _write_durably(directory: Path, name: str, data: bytes) -> None:
    """Write via a temp file and rename, so a crash never leaves a torn file."""
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=TMP_PREFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, directory / name)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _sync_dirs(directories: Iterable[Path]) -> None:
    """Make renames in these directories durable (best effort: a failure here
    only weakens power-loss safety, which the next run repairs)."""
    for directory in directories:
        try:
            fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)


def finish(layout: Layout, items: list[Finish]) -> list[str | OSError]:
    """Move each file to done/ or failed/; returns its final name, or the error.

    The outcome files are written and synced first, the moves come after: a crash in
    between leaves a file where it was, and the next run writes its outcome again
    under the same final name (that name depends only on the file and on what is
    already in done/ or failed/). Directories are synced once per batch."""
    results: list[str | OSError] = []
    moves: list[tuple[int, Path, Path]] = []
    taken: set[Path] = set()
    for index, item in enumerate(items):
        dest = layout.sub("done" if item.ok else "failed")
        final = item.name
        if dest / final in taken or os.path.lexists(dest / final):
            final = fit(item.name, f".{item.tag}")
        taken.add(dest / final)
        source = layout.inbox if item.source == "inbox" else layout.sub("processing")
        try:
            if item.out_json is not None:
                _write_durably(layout.sub("out"), fit(final, ".json"), item.out_json)
            if item.reason is not None:
                reason = item.reason.replace("\n", " ") + "\n"
                _write_durably(layout.sub("failed"), fit(final, ".reason"), reason.encode())
        except OSError as exc:
            results.append(exc)
            continue
        results.append(final)
        moves.append((index, source / item.name, dest / final))
    _sync_dirs([layout.sub("out"), layout.sub("failed")])
    for index, source, target in moves:
        try:
            os.rename(source, target)
        except OSError as exc:
            results[index] = exc
    _sync_dirs({path.parent for _, source, target in moves for path in (source, target)})
    return results
