"""Token bytes -> streamed text, with stop sequences, for backends that decode locally."""

from __future__ import annotations

import codecs
from collections.abc import Callable, Sequence


class TextAssembler:
    """Bytes -> text as tokens arrive: whole UTF-8 characters only (bytes that are not UTF-8
    become U+FFFD), stop sequences cut, and text that might be the start of a stop sequence
    held back from ``sink`` until it is known not to be."""

    def __init__(self, stop: Sequence[str], sink: Callable[[str], None] | None) -> None:
        self._stop = [s for s in stop if s]
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self._sink = sink
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._text = ""
        self._sent = 0
        self._stopped = False

    def add(self, piece: bytes) -> bool:
        """Append a token's bytes; ``True`` when a stop sequence has been reached."""
        self._text += self._decoder.decode(piece)
        for s in self._stop:
            at = self._text.find(s, max(0, self._sent - len(s)))
            if at >= 0:
                self._stopped = True
                self._text = self._text[:at]
                self._emit(len(self._text))
                return True
        self._emit(len(self._text) - self._held())
        return False

    def _held(self) -> int:
        for n in range(min(self._hold, len(self._text)), 0, -1):
            tail = self._text[-n:]
            if any(s.startswith(tail) for s in self._stop):
                return n
        return 0

    def _emit(self, upto: int) -> None:
        if upto > self._sent:
            if self._sink is not None:
                self._sink(self._text[self._sent : upto])
            self._sent = upto

    def finish(self) -> str:
        if not self._stopped:
            self._text += self._decoder.decode(b"", final=True)
        self._emit(len(self._text))
        return self._text
