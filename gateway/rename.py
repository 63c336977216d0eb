"""Showing clients the model name they asked for in upstream answers.

The gateway sends a model server the name it serves under (``served_model_name``, or
the model's own name when the client used an alias), and the server's answer carries
that name in ``"model"``. A ``ModelRenamer`` puts the client's name back, byte for byte,
without parsing JSON: ``"model":"<served>"`` and ``"model": "<served>"`` (the spacing
json.dumps and FastAPI use) become the client's name, with two ``bytes.replace``. A
string value can never match by accident: inside a JSON string every quote is escaped.
Built only when the two names differ, so a request that needs no renaming costs nothing.
"""
from __future__ import annotations

import json
from functools import lru_cache


@lru_cache(maxsize=256)  # (served, shown) pairs come from the configuration: bounded
def _pairs(served: str, shown: str) -> tuple[tuple[bytes, bytes], ...]:
    old, new = json.dumps(served).encode(), json.dumps(shown).encode()
    return tuple((key + old, key + new) for key in (b'"model":', b'"model": '))


class ModelRenamer:
    """Rewrites one answer's model name; ``feed``/``flush`` for a body that arrives in
    pieces (a name split across two pieces is held back until it is whole)."""

    __slots__ = ("_pairs", "_longest", "_needle_bytes", "_pending")

    def __init__(self, served: str, shown: str) -> None:
        self._pairs = _pairs(served, shown)
        self._longest = max(len(old) for old, _ in self._pairs)
        self._needle_bytes = frozenset(b"".join(old for old, _ in self._pairs))
        self._pending = b""

    def whole(self, body: bytes) -> bytes:
        """A complete body, renamed."""
        for old, new in self._pairs:
            body = body.replace(old, new)
        return body

    def feed(self, chunk: bytes) -> bytes:
        """The renamed bytes that can be sent now; a trailing partial match is kept."""
        data = self._pending + chunk if self._pending else chunk
        cut = self._partial_tail(data)
        if cut < len(data):
            self._pending, data = data[cut:], data[:cut]
        else:
            self._pending = b""
        return self.whole(data)

    def flush(self) -> bytes:
        """Whatever is still held back, at the end of the body."""
        rest, self._pending = self._pending, b""
        return self.whole(rest)

    def _partial_tail(self, data: bytes) -> int:
        """Where a suffix that could begin a match starts (``len(data)`` if none)."""
        n = len(data)
        if not n or data[-1] not in self._needle_bytes:
            return n  # an SSE event ends in a newline: a stream's chunks are never held
        window = max(0, n - 2 * self._longest)
        last_end = 0  # a complete match may overlap the tail: never cut one
        for old, _ in self._pairs:
            at = data.rfind(old, window)
            if at >= 0:
                last_end = max(last_end, at + len(old))
        at = data.find(b'"', max(n - self._longest + 1, last_end, 0))
        while at >= 0:
            tail = data[at:]
            if any(old.startswith(tail) for old, _ in self._pairs):
                return at
            at = data.find(b'"', at + 1)
        return n
