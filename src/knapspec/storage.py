"""Where knapspec keeps what it writes, and how it writes it.

* :func:`cache_dir`: the root of everything knapspec writes (converted checkpoints, native kernel
  builds, latency profiles, calibrations, the hybrid's memory): ``$KNAPSPEC_CACHE``, default
  ``~/.cache/knapspec``.
* :func:`write_text_atomic` / :func:`write_json_atomic`: a file is written beside its final name
  and renamed into place, so an interrupted write leaves the previous file (or none), never half
  of one.

This module imports nothing else of knapspec: every other module may depend on it.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def cache_dir() -> Path:
    """Root of everything knapspec writes."""
    env = os.environ.get("KNAPSPEC_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "knapspec"


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to ``path`` atomically (parents made as needed); returns the path."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return p


def write_json_atomic(path: str | os.PathLike[str], obj: Any, *, indent: int | None = 1) -> Path:
    """:func:`write_text_atomic` of ``obj`` as JSON."""
    return write_text_atomic(path, json.dumps(obj, indent=indent) + "\n")
