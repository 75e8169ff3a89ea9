"""Plans: which of a decoder's 2L residual sublayers run.

Sublayer ``2i`` is layer ``i``'s attention, ``2i + 1`` its MLP. A plan is an immutable tuple of
booleans (``True`` = the sublayer runs); the full plan runs all of them. A skipped sublayer is the
identity on the residual stream and writes no KV. A running attention sublayer may also be
*windowed* (drafts only): each query attends to the first ``SINK`` positions and the last ``W``
positions up to itself (StreamingLLM-style), so its cost stops growing with the context.

Text form (CLI, plan files, logs): the skipped sublayers as ``a3,a7,m12`` (``a`` attention,
``m`` MLP, layer index), windowed attention sublayers as ``a5w256`` (window of 256 keys plus the
sink), ``full`` (nothing skipped) or ``-``.

This module does not import torch and knows nothing about models, caches or drafts.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

_TOKEN = re.compile(r"^([am])(\d+)(?:w(\d+))?$")

# Positions every windowed attention keeps in view besides its window (the "attention sink":
# StreamingLLM, MagicDec, TriForce keep the first few tokens, whose keys draw much of the
# attention mass).
SINK = 4


@dataclass(frozen=True)
class Plan:
    """One on/off entry per sublayer, in execution order (attention 0, MLP 0, attention 1, ...),
    and optionally one window per sublayer (``window[s]`` > 0: attention sublayer ``s`` attends to
    the sink and its last ``window[s]`` positions; 0: full attention; empty: no window anywhere)."""

    run: tuple[bool, ...]
    window: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        assert len(self.run) % 2 == 0 and len(self.run) > 0, "a plan has 2L entries, L >= 1"
        if self.window:
            assert len(self.window) == len(self.run), "a plan's windows have one entry per sublayer"
            assert all(w >= 0 for w in self.window) and not any(self.window[1::2]), \
                "windows are for attention sublayers only, and positive"
            if not any(w and r for w, r in zip(self.window, self.run)):
                object.__setattr__(self, "window", ())     # one form for "no window"
            else:
                object.__setattr__(self, "window", tuple(w if r else 0 for w, r in zip(self.window, self.run)))

    # ---- constructors -------------------------------------------------------------------------
    @classmethod
    def full(cls, n_layers: int) -> Plan:
        return cls((True,) * (2 * n_layers))

    @classmethod
    def from_skips(cls, n_layers: int, *, attn: tuple[int, ...] | list[int] = (),
                   mlp: tuple[int, ...] | list[int] = ()) -> Plan:
        run = [True] * (2 * n_layers)
        for name, idxs, off in (("attention", attn, 0), ("MLP", mlp, 1)):
            for i in idxs:
                if not 0 <= i < n_layers:
                    raise ValueError(f"{name} layer {i} does not exist: the model has layers 0..{n_layers - 1}")
                run[2 * i + off] = False
        return cls(tuple(run))

    @classmethod
    def from_options(cls, options: list[int] | tuple[int, ...]) -> Plan:
        """From one option per sublayer: 0 = skipped, 1 = full, ``W`` > 1 = attention windowed to
        ``W`` keys (plus the sink)."""
        return cls(tuple(o != 0 for o in options), tuple(o if o > 1 else 0 for o in options))

    @classmethod
    def from_sublayer_skips(cls, n_layers: int, skipped: set[int] | frozenset[int] | list[int]) -> Plan:
        run = [True] * (2 * n_layers)
        for s in skipped:
            assert 0 <= s < 2 * n_layers, f"sublayer {s} out of range"
            run[s] = False
        return cls(tuple(run))

    @classmethod
    def parse(cls, text: str, n_layers: int) -> Plan:
        """Parse ``a3,a7,m12`` (skipped sublayers), ``full`` or ``-``."""
        text = text.strip()
        if text in ("", "-", "full", "none"):
            return cls.full(n_layers)
        attn: list[int] = []
        mlp: list[int] = []
        windows: dict[int, int] = {}
        for tok in text.replace(" ", "").split(","):
            m = _TOKEN.match(tok)
            if m is None or (m.group(3) is not None and (m.group(1) != "a" or int(m.group(3)) < 1)):
                raise ValueError(
                    f"bad skip entry {tok!r}: expected aN (attention of layer N), mN (MLP of layer N) or "
                    "aNwW (attention of layer N windowed to W keys), comma-separated, e.g. a3,a7w256,m12")
            i = int(m.group(2))
            if m.group(3) is not None:
                if not 0 <= i < n_layers:
                    raise ValueError(f"attention layer {i} does not exist: the model has layers 0..{n_layers - 1}")
                windows[i] = int(m.group(3))
            else:
                (attn if m.group(1) == "a" else mlp).append(i)
        plan = cls.from_skips(n_layers, attn=attn, mlp=mlp)
        if not windows:
            return plan
        if set(windows) & set(attn):
            raise ValueError("an attention sublayer is either skipped or windowed, not both")
        win = [0] * (2 * n_layers)
        for i, w in windows.items():
            win[2 * i] = w
        return cls(plan.run, tuple(win))

    @classmethod
    def load(cls, path: str | Path, n_layers: int) -> Plan:
        """Read a plan file: JSON ``{"skip": "a3,m5"}`` (as written by :meth:`save`) or plain text."""
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"plan file {str(p)!r} does not exist")
        raw = p.read_text().strip()
        if raw.startswith("{"):
            try:
                data = json.loads(raw)
            except json.JSONDecodeError as e:
                raise ValueError(f"plan file {str(p)!r} is not valid JSON ({e.msg}); expected "
                                 '{"skip": "a3,m5"} or a line like a3,m5') from None
            if not isinstance(data, dict) or "skip" not in data:
                raise ValueError(f'plan file {str(p)!r} has no "skip" key; expected {{"skip": "a3,m5"}}')
            if data.get("n_layers", n_layers) != n_layers:
                raise ValueError(f"plan file {str(p)!r} is for a model with {data['n_layers']} layers, "
                                 f"this model has {n_layers}")
            return cls.parse(str(data["skip"]), n_layers)
        return cls.parse(raw, n_layers)

    def save(self, path: str | Path, **extra: object) -> None:
        Path(path).write_text(json.dumps({"skip": str(self), "n_layers": self.n_layers, **extra}, indent=1))

    # ---- queries ------------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return len(self.run) // 2

    @property
    def n_sublayers(self) -> int:
        return len(self.run)

    @property
    def attn_skipped(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.n_layers) if not self.run[2 * i])

    @property
    def mlp_skipped(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.n_layers) if not self.run[2 * i + 1])

    @property
    def attn_windowed(self) -> dict[int, int]:
        """Layer -> window of every windowed attention sublayer."""
        return {s // 2: w for s, w in enumerate(self.window) if w}

    def window_of(self, s: int) -> int:
        """The window of sublayer ``s`` (0: full attention, or not an attention sublayer)."""
        return self.window[s] if self.window else 0

    def options(self) -> tuple[int, ...]:
        """One option per sublayer: 0 skipped, 1 full, ``W`` windowed (see :meth:`from_options`)."""
        return tuple((self.window_of(s) or 1) if r else 0 for s, r in enumerate(self.run))

    @property
    def n_skipped(self) -> int:
        return sum(1 for r in self.run if not r)

    @property
    def is_full(self) -> bool:
        return all(self.run) and not self.window

    def last_layer_run(self) -> int:
        """Index of the last layer with a running sublayer, or -1 if none runs."""
        for s in range(len(self.run) - 1, -1, -1):
            if self.run[s]:
                return s // 2
        return -1

    def __str__(self) -> str:
        if self.is_full:
            return "full"
        parts = [f"a{i}" for i in self.attn_skipped] + [f"m{i}" for i in self.mlp_skipped]
        parts += [f"a{i}w{w}" for i, w in self.attn_windowed.items()]
        return ",".join(parts)
