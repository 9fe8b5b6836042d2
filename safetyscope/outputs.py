"""Safe output handling, shared by every command that writes a file or directory.

Three rules, so a careless ``-o``/``--overwrite`` can never destroy data the tool did not write:

* ``check_output`` runs *before* any work: the output must be writable (its parent a directory we can
  create a file in), must not be ``.``/``..``, the working directory or one of its ancestors, and must
  not be or contain an input. An existing output is only accepted with ``--overwrite`` (or, for a JSON
  document, when this tool wrote it) and only if it is a plain file or a directory carrying this tool's
  marker file, which lists what the tool put there: a file added to it later is never deleted.
* ``replace(tmp, out)`` is the one place that deletes an old output, and it re-checks the same rule.
* ``output_errors`` turns the write-side OSErrors a user can fix (disk full, read-only file system,
  permission) into one-line ``SafetyScopeError``s; whatever was finished before stays for a resume.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from .errors import SafetyScopeError

# Written inside every directory this tool produces (HF datasets, report directories): the proof that
# ``--overwrite`` may delete it.
MARKER = ".safetyscope-output"

_USER_FIXABLE = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded", errno.EROFS: "read-only file system",
                 errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
                 errno.ENOTDIR: "a parent is not a directory", errno.ENOENT: "no such directory"}


def _is_ours(p: Path) -> bool:
    """A plain file (or a symlink, of which only the link is removed) or a directory with our marker."""
    if p.is_symlink() or p.is_file():
        return True
    return p.is_dir() and (p / MARKER).is_file()


def _listed(directory: Path) -> set[str] | None:
    """The entries the marker says this tool wrote into ``directory`` (None: a marker without a list, written
    before lists were recorded)."""
    try:
        lines = (directory / MARKER).read_text().splitlines()
        return set(json.loads(lines[1])["entries"]) if len(lines) > 1 else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def foreign_entries(directory: Path) -> list[str]:
    """Entries of a marked directory that this tool did not write (added by someone later): replacing the
    directory would delete them."""
    listed = _listed(directory)
    names = sorted(e.name for e in directory.iterdir() if e.name != MARKER)
    return names if listed is None else [n for n in names if n not in listed]


def _refuse_foreign(p: Path, raw: str) -> None:
    if p.is_dir() and not p.is_symlink():
        foreign = foreign_entries(p)
        if foreign:
            more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
            raise SafetyScopeError(f"{raw} holds files safetyscope did not write ({', '.join(foreign[:3])}{more}); "
                                   "--overwrite would delete them: move them out or pick another path")


# the document each file-writing kind of output holds: a rerun replaces only a document of its own kind
_KIND_FORMAT = {"classifier file": "safetyscope-classifier", "targets file": "safetyscope-targets",
                "report file": "safetyscope-coverage"}


def _is_our_document(p: Path, fmt: str | None = None) -> bool:
    """A JSON document this tool writes (classifier, targets, report files carry ``"format": "safetyscope-..."``);
    with ``fmt``, one of that format only."""
    try:
        if not p.is_file() or p.is_symlink() or p.stat().st_size > 512 << 20:
            return False
        with open(p, "rb") as fh:
            head = fh.read(4096)
        tail = (fmt or "safetyscope-").encode() + (b'"' if fmt else b"")
        return b'"format": "' + tail in head or b'"format":"' + tail in head
    except OSError:
        return False


def _check_place(raw: str, inputs: Iterable[str | os.PathLike], kind: str) -> Path:
    """Not ``.``/``..``, not the working directory or its ancestors, not an input or a directory holding one."""
    out = Path(raw)
    if out.name in ("", ".", "..") or raw.rstrip("/") in ("", ".", ".."):
        raise SafetyScopeError(f"{kind} {raw!r} is a directory name, not an output path; name a new file or directory")
    target = out.resolve()
    cwd = Path.cwd().resolve()
    if target == cwd or target in cwd.parents:
        raise SafetyScopeError(f"{kind} {raw} is the working directory or one of its parents; name a new path")
    for inp in inputs:
        ri = Path(inp).resolve()
        if target == ri or target in ri.parents:
            raise SafetyScopeError(f"{kind} {raw} is or contains the input {inp}; write somewhere else")
    return target


def _probe_dir(directory: Path, raw: str) -> None:
    """Create the directory if needed and prove a file can be made in it (access(2) says yes to root on
    /proc and is no proof of free inodes)."""
    with output_errors(raw):
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise SafetyScopeError(f"cannot write {raw}: {directory} is not a directory") from None
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".safetyscope-probe-")
        os.close(fd)
        os.unlink(probe)


def check_output(output: str | os.PathLike, *, inputs: Iterable[str | os.PathLike] = (), overwrite: bool = False,
                 kind: str = "output", file_only: bool = False, reused: bool = False) -> Path:
    """Validate ``output`` before any work; returns it as a Path. See the module docstring for the rules.
    ``file_only``: the command writes one file (a JSON document), so an existing directory is a mistake; such a
    file that this tool wrote (``"format": "safetyscope-..."``) is replaced without ``--overwrite``, as a rerun
    expects. ``reused``: an existing directory of ours is resumed, not replaced (parts directories)."""
    raw = os.fspath(output)
    out = Path(raw)
    target = _check_place(raw, inputs, kind)
    if file_only and out.is_dir():
        raise SafetyScopeError(f"{kind} {raw} is a directory; name a file to write")
    if not file_only and _is_our_document(out):  # e.g. `classify -o clf.json --overwrite` with -c clf.json
        raise SafetyScopeError(f"{raw} is a safetyscope classifier, targets or report file, not a table; "
                               "--overwrite does not replace it with one: name another output")
    if out.exists() or out.is_symlink():
        if not overwrite and not (file_only and _is_our_document(out, _KIND_FORMAT.get(kind))):
            raise SafetyScopeError(f"{raw} already exists; pass --overwrite to replace it")
        if not _is_ours(out):
            raise SafetyScopeError(f"{raw} is a directory safetyscope did not write (no {MARKER} file in it); "
                                   "--overwrite only replaces the tool's own outputs: delete it yourself or pick another path")
        if not reused:
            _refuse_foreign(out, raw)
    _probe_dir(target.parent, raw)
    return out


def check_report_dir(output: str | os.PathLike, *, inputs: Iterable[str | os.PathLike] = (),
                     overwrite: bool = False) -> Path:
    """A report directory (eval, overlap, synth compare): same place rules as ``check_output``. The command only
    (over)writes its own named files and deletes nothing, so a directory it made earlier (marked) or an empty one
    is reused; a user's directory holding anything (it may hold a file of a report file's name) only with
    ``overwrite``, and even then nothing but the report's own files is replaced."""
    raw = os.fspath(output)
    out = Path(raw)
    target = _check_place(raw, inputs, "report directory")
    if out.exists() and not out.is_dir():
        raise SafetyScopeError(f"{raw} exists and is not a directory; name a report directory")
    existed = out.exists()
    if existed and not overwrite and not (out / MARKER).is_file() and any(out.iterdir()):
        raise SafetyScopeError(f"{raw} is a directory safetyscope did not write (no {MARKER} file in it); pass "
                               "--overwrite to write the report into it (only files of the report's names are "
                               "replaced, nothing is deleted) or name a new directory")
    _probe_dir(target, raw)
    if not existed:  # only a directory we made is ours: marking a user's would let --overwrite delete it later
        mark(out)
    return out


def temp_path(out: Path) -> Path:
    """Where ``out`` is built before ``replace``: beside it (same file system, so the rename is atomic),
    under a name no user file has."""
    return out.with_name(f".{out.name}.safetyscope-tmp")


def mark(directory: Path) -> None:
    """The marker, listing what the directory holds now (all of it ours): a file added later is not ours, and
    ``--overwrite`` refuses to delete it."""
    entries = sorted(e.name for e in directory.iterdir() if e.name != MARKER)
    (directory / MARKER).write_text("written by safetyscope; --overwrite may replace this directory\n"
                                    + json.dumps({"entries": entries}) + "\n")


def remove_temp(tmp: Path) -> None:
    if tmp.is_dir() and not tmp.is_symlink():
        shutil.rmtree(tmp)
    elif tmp.exists() or tmp.is_symlink():
        tmp.unlink()


def replace(tmp: Path, out: Path) -> None:
    """Move the finished ``tmp`` to ``out``, deleting an old ``out`` only if it is ours."""
    if tmp.is_dir():
        mark(tmp)
    if out.exists() or out.is_symlink():
        if not _is_ours(out):
            raise SafetyScopeError(f"{out} is a directory safetyscope did not write; refusing to replace it")
        _refuse_foreign(out, str(out))
        if out.is_dir() and not out.is_symlink():
            shutil.rmtree(out)
        elif tmp.is_dir():
            out.unlink()
    os.replace(tmp, out)


@contextlib.contextmanager
def output_errors(path: str | os.PathLike, resume_hint: str = "") -> Iterator[None]:
    """OSErrors of writing ``path`` that the user can fix -> one-line SafetyScopeError."""
    try:
        yield
    except OSError as e:
        if e.errno not in _USER_FIXABLE:
            raise
        what = _USER_FIXABLE[e.errno]
        raise SafetyScopeError(f"cannot write {path}: {what} ({e.strerror or e}){resume_hint}") from None


@contextlib.contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """An exclusive lock beside ``out`` for the whole run, so a second run on the same output fails fast
    instead of racing on its parts or temporary files."""
    lock = out.with_name(f".{out.name}.safetyscope-lock")
    while True:
        with output_errors(lock):
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise SafetyScopeError(f"another safetyscope run is writing {out} right now; wait for it or pick "
                                   "another output") from None
        # The holder before us may have unlinked the file between our open and our flock: then our lock
        # is on a dead inode and a third run could lock a new file; retry on the current one.
        try:
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)
        os.close(fd)
