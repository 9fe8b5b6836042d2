"""Full-weight fingerprints cached per file, so reloading an unchanged model or SAE does not hash it again.

The key is the absolute path, size, mtime_ns and inode of every file the weights were read from, plus a
salt naming whatever else decides the hash (the loader's code, the dtype, the SAE's k ...). Editing a file
changes its mtime, replacing it changes its inode: either way it is hashed again. A cached value is exactly
what the hash gave when it was stored, so fingerprints are the same with or without the cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path


def cache_dir() -> Path:
    """User cache (``SAFETYSCOPE_CACHE`` or ``~/.cache/safetyscope``)."""
    d = Path(os.environ.get("SAFETYSCOPE_CACHE", Path.home() / ".cache" / "safetyscope"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def _stamps(files: Iterable[Path]) -> list[list]:
    out = []
    for f in files:
        st = os.stat(f)
        out.append([str(Path(f).resolve()), st.st_size, st.st_mtime_ns, st.st_ino])
    return out


def cached_hash(files: Iterable[Path], salt: str, compute: Callable[[], str]) -> str:
    """``compute()``, or the value it gave before for these very files and salt. Without files (weights
    built in memory) it is always computed."""
    files = list(files)
    if not files:
        return compute()
    try:
        key = [salt, _stamps(files)]
        entry = cache_dir() / "fingerprints" / (hashlib.sha256(json.dumps(key).encode()).hexdigest()[:32] + ".json")
    except OSError:  # a file vanished, or no cache directory can be made: hash without the cache
        return compute()
    try:
        stored = json.loads(entry.read_text())
        if stored["key"] == key:
            return stored["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError):
        pass  # absent or unreadable: hash again
    value = compute()
    tmp = entry.with_name(f".{entry.name}.{os.getpid()}.tmp")
    try:  # tmp + rename, so a concurrent reader never sees half an entry
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({"key": key, "fingerprint": value}))
        os.replace(tmp, entry)
    except OSError:  # a full or read-only cache only costs the hash next time
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
    return value


def source_digest(path: str | Path) -> str:
    """A short hash of a module's source: cached fingerprints of tensors a loader transformed (b_dec folded
    into b_enc) are only reused while that loader's code is unchanged."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
