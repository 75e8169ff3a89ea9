"""What the layer-skip planner learns about a machine, per context bucket, kept across generations
and processes.

A verdict of the KnapSpec planner ("no draft pays here", or "this plan, at this acceptance") holds
for a model on a machine (dtype, threads, kernels) at a range of context lengths far longer than
one generation: the dynamic program that finds it costs tens to hundreds of milliseconds, so a new
generation (or a new process) should not pay it again to relearn the same answer. The memory is
one small JSON file per set-up, keyed like the latency profile (``latency.profile_key``), holding
per context bucket (powers of two, :func:`bucket`):

* ``streak``: "no draft" verdicts of the dynamic program in a row (the back-off level);
* ``gated``: decisions taken from the memory since the last dynamic program in this bucket (the
  back-off runs the program again after ``2**streak`` of them, at most 64);
* ``plan``, ``alpha``, ``d``: the plan that paid last (text form), its acceptance (updated with
  the acceptance measured while drafting) and draft length; ``null`` after a "no draft" verdict;
* ``candidates``: the last program's candidate plans with their acceptance, which price an upper
  bound on what another run of the program could find (``KnapSpecStrategy.tpt_bound``);
* ``probed``: the window probe's plans with their acceptance (full vocabulary and per subset of
  the draft vocabulary); ``probe_streak``: probes in a row that found no plan that pays, and
  ``probe_gated``: generations since the last one (the probe runs again after ``2**probe_streak``
  of them, at most 64); ``probe_next``: the window the probe tries in the next generation (it
  probes one a generation, largest first), ``null`` when it is done.

The hybrid strategy's planner uses the same file, so both strategies learn from each other. A
file of another version is ignored (and replaced).
``path=None`` keeps the memory in the process only (tests, ``memory="off"``). This module decides
nothing; it stores and reads.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ..storage import write_json_atomic

log = logging.getLogger(__name__)

# Context buckets: one per octave, with boundaries at 3/4 of a power of two (..., 1536, 3072,
# 6144, 12288, ...), so that the usual sizes of a context (2k, 4k, 8k tokens and a little more or
# less) sit inside a bucket, not on a boundary; everything below 384 tokens is one bucket.
_MIN_BUCKET = 8
VERSION = 2


def bucket(ctx: int) -> int:
    """The context bucket of a context length: ``floor(log2(ctx * 4/3))``, at least 8
    (4096 tokens: bucket 12 = [3072, 6144))."""
    return max((int(ctx) * 4 // 3).bit_length() - 1, _MIN_BUCKET)


def default_memory_path(model: Any) -> Path:
    """Where the planner's verdicts are remembered: keyed like the latency profile (model shape,
    device, dtype, threads, torch version, kernels)."""
    from ..latency import profile_key, profile_path
    p = profile_path(profile_key(model))
    return p.parent.parent / "planner" / p.name


class PlanMemory:
    """Per-bucket verdicts (see the module docstring), read from ``path`` when it changed on disk
    and written back on every update."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = None if path is None else Path(path)
        self._buckets: dict[int, dict[str, Any]] = {}
        self._stamp: tuple[int, int] | None = None
        self._warned = False

    def _load(self) -> None:
        if self.path is None:
            return
        try:
            st = self.path.stat()
        except OSError:
            return
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp == self._stamp:
            return
        self._stamp = stamp
        try:
            doc = json.loads(self.path.read_text())
            if not isinstance(doc, dict) or doc.get("version") != VERSION:
                raise ValueError("another version")
            buckets = {int(k): dict(v) for k, v in doc["buckets"].items()}
            for v in buckets.values():
                if not isinstance(v.get("streak", 0), int) or v.get("streak", 0) < 0:
                    raise ValueError(f"bad streak {v.get('streak')!r}")
            self._buckets = buckets
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:   # unreadable: start afresh
            if not self._warned:
                log.warning("ignoring the planner's memory %s (%s)", self.path, e)
                self._warned = True
            self._buckets = {}

    def get(self, b: int) -> dict[str, Any]:
        """The entry of bucket ``b`` (a copy; empty when nothing is known)."""
        self._load()
        return dict(self._buckets.get(b, {}))

    def buckets(self) -> dict[int, dict[str, Any]]:
        self._load()
        return {k: dict(v) for k, v in self._buckets.items()}

    def update(self, b: int, **fields: Any) -> None:
        """Set fields of bucket ``b`` and write the file (a read-only cache folder: kept in the
        process only)."""
        self._load()
        entry = self._buckets.setdefault(b, {})
        entry.update(fields)
        if self.path is None:
            return
        try:
            write_json_atomic(self.path, {"version": VERSION,
                                          "buckets": {str(k): v for k, v in sorted(self._buckets.items())}},
                              indent=None)
            st = self.path.stat()
            self._stamp = (st.st_mtime_ns, st.st_size)
        except OSError as e:
            log.debug("could not write %s: %s", self.path, e)

    def forget(self) -> None:
        """Forget every verdict (and remove the file)."""
        self._buckets = {}
        self._stamp = None
        if self.path is not None:
            self.path.unlink(missing_ok=True)
