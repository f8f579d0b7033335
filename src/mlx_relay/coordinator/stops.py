"""Incremental output text: a streaming detokenizer plus stop-string handling.

Text is released to the caller only when it can no longer become part of a stop string, so a
stop string is never emitted, not even its first characters, and the final text ends right
before the first stop string found.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


class Detokenizer(Protocol):
    """The part of mlx-lm's ``StreamingDetokenizer`` that :class:`TextStream` uses."""

    def add_token(self, token: int) -> None: ...

    def finalize(self) -> None: ...

    @property
    def last_segment(self) -> str: ...


@dataclass(frozen=True)
class StopScan:
    """What :meth:`StopMatcher.scan` found in the pending text."""

    release: str
    """Text that is safe to emit now."""
    keep: str
    """Text held back: a suffix that may be the start of a stop string."""
    stopped: bool
    """A stop string was found; ``release`` ends right before it and ``keep`` is empty."""


class StopMatcher:
    """Finds stop strings in text that arrives in pieces. Pure: no tokenizer involved."""

    def __init__(self, stops: Sequence[str]) -> None:
        if any(not stop for stop in stops):
            raise ValueError("stop strings must not be empty")
        self.stops = tuple(stops)
        self._longest = max((len(stop) for stop in self.stops), default=0)

    def scan(self, pending: str, *, final: bool = False) -> StopScan:
        """Split ``pending`` (all text not yet emitted) into what can be released and what
        must be held back; with ``final`` nothing is held back."""
        first = min(
            (i for i in (pending.find(stop) for stop in self.stops) if i >= 0),
            default=-1,
        )
        if first >= 0:
            return StopScan(pending[:first], "", True)
        if final:
            return StopScan(pending, "", False)
        hold = self._held_suffix(pending)
        return StopScan(pending[: len(pending) - hold], pending[len(pending) - hold :], False)

    def _held_suffix(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
        for length in range(min(len(text), self._longest - 1), 0, -1):
            suffix = text[-length:]
            if any(stop.startswith(suffix) for stop in self.stops):
                return length
        return 0


class TextStream:
    """Turns generated token ids into releasable text deltas.

    Args:
        detokenizer: a fresh streaming detokenizer (``tokenizer.detokenizer`` gives one per
            request); it never releases an incomplete UTF-8 character.
        stops: stop strings; the text ends before the first one that appears.
    """

    def __init__(self, detokenizer: Detokenizer, stops: Sequence[str] = ()) -> None:
        self._detokenizer = detokenizer
        self._matcher = StopMatcher(stops)
        self._pending = ""
        self._parts: list[str] = []
        self.stopped = False

    @property
    def text(self) -> str:
        """All text released so far."""
        return "".join(self._parts)

    def add(self, token_id: int) -> str:
        """Feed one generated token; returns the text that became safe to emit (maybe "").
        After a stop string has been found, further tokens are ignored."""
        if self.stopped:
            return ""
        self._detokenizer.add_token(token_id)
        return self._take(self._detokenizer.last_segment, final=False)

    def finish(self) -> str:
        """Flush the detokenizer and release everything still held (no stop string can
        complete any more)."""
        if self.stopped:
            return ""
        self._detokenizer.finalize()
        return self._take(self._detokenizer.last_segment, final=True)

    def _take(self, segment: str, *, final: bool) -> str:
        scan = self._matcher.scan(self._pending + segment, final=final)
        self._pending = scan.keep
        self.stopped = scan.stopped
        if scan.release:
            self._parts.append(scan.release)
        return scan.release
