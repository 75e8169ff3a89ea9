"""Text out of a growing token sequence, released as it becomes final, cut at stop strings.

:class:`StopText` is fed the tokens of each decoding round and answers with the text that can be
sent now. Tokens are decoded one at a time in a short window (the tokens since the last piece of
text that was complete, as text-generation-inference's streaming does): a character split over
tokens, or a tokenizer that merges spaces across tokens, is held until the next token settles it,
and a round costs the same at any length of output. Stop strings are matched on the decoded text,
across token boundaries, after every token: the text ends before the first one, which is never
released, and the tokens past the one that completed it are dropped. While streaming, text that
might be the start of a stop string is held back until it is known not to be.

This module knows nothing about models or HTTP; ``decode`` is the tokenizer's.
"""

from __future__ import annotations

from collections.abc import Callable


class StopText:
    def __init__(self, decode: Callable[[list[int]], str], stops: tuple[str, ...] = ()) -> None:
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        self._decode = decode
        self.stops = tuple(stops)
        self._longest = max((len(s) for s in stops), default=0)
        self.tokens: list[int] = []      # the tokens kept (up to the one that completed a stop)
        self.text = ""                   # their text, without a trailing incomplete piece
        self.sent = 0                    # characters of ``text`` released so far
        self.stopped = False             # a stop string was found (``text`` ends before it)
        self._prefix = 0                 # window: tokens[_prefix:_read] decode to text already taken
        self._read = 0

    def feed(self, chunk: list[int]) -> tuple[str, int]:
        """Take one round's tokens: ``(text to release now, how many of the tokens count)``. After
        a stop string the count is the tokens up to the one that completed it (``stopped`` is set)
        and later calls take nothing."""
        used = 0
        for tok in chunk:
            if self.stopped:
                break
            used += 1
            self.tokens.append(tok)
            before = len(self.text)
            self._advance()
            if self.stops and len(self.text) > before:
                self._find_stop(max(before - self._longest + 1, self.sent, 0))
        return self._release(final=False), used

    def finish(self) -> str:
        """The rest of the text (the end of generation): what was held back as a possible start of
        a stop string, and a trailing incomplete character as the tokenizer decodes it."""
        if not self.stopped and self._read < len(self.tokens):
            head = self._decode(self.tokens[self._prefix:self._read])
            tail = self._decode(self.tokens[self._prefix:])[len(head):]
            if tail:
                self.text += tail
                self._prefix = self._read = len(self.tokens)
                if self.stops:
                    self._find_stop(max(len(self.text) - len(tail) - self._longest + 1, self.sent, 0))
        return self._release(final=True)

    # ---- internals ----------------------------------------------------------------------------------
    def _advance(self) -> None:
        head = self._decode(self.tokens[self._prefix:self._read])
        full = self._decode(self.tokens[self._prefix:])
        if len(full) > len(head) and not full.endswith("\ufffd"):
            self.text += full[len(head):]
            self._prefix, self._read = self._read, len(self.tokens)

    def _find_stop(self, start: int) -> None:
        hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if hits:
            self.text = self.text[:max(min(hits), self.sent)]
            self.stopped = True

    def _release(self, *, final: bool) -> str:
        end = len(self.text)
        if not final and not self.stopped and self.stops:
            end -= self._held(self.text[self.sent:])
        out = self.text[self.sent:end]
        self.sent = end
        return out

    def _held(self, pending: str) -> int:
        """Length of the longest end of ``pending`` that begins some stop string."""
        for k in range(min(len(pending), self._longest - 1), 0, -1):
            tail = pending[-k:]
            if any(s.startswith(tail) for s in self.stops):
                return k
        return 0
