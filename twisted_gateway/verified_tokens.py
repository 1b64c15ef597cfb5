"""
Tokens the gateway has verified, so that a client presenting the same token
again (every REST call, every reconnect) costs a dictionary look-up instead of
a signature check.

Keyed by the whole token string, so a token that differs in any byte is
verified afresh. An entry lives until the token's ``exp`` (read from the
injected clock) and never past it, the least recently used goes first when
``size`` is reached, and tokens without ``exp`` are not kept. The owner
empties it when the keys that verified its tokens change.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Generic, TypeVar

_Value = TypeVar("_Value")


class VerifiedTokens(Generic[_Value]):
    """A bounded map of token -> what its verification gave, each until its expiry."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._entries: OrderedDict[str, tuple[float, _Value]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, token: str, now: float) -> _Value | None:
        """The verified value of ``token`` if it is kept and not expired at ``now``."""
        entry = self._entries.get(token)
        if entry is None:
            return None
        expires, value = entry
        if now >= expires:
            del self._entries[token]
            return None
        self._entries.move_to_end(token)
        return value

    def put(self, token: str, value: _Value, expires: float | None, now: float) -> None:
        """Keep ``value`` for ``token`` until ``expires``; a token without one is not kept."""
        if self.size <= 0 or expires is None or now >= expires:
            return
        self._entries[token] = (expires, value)
        self._entries.move_to_end(token)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        """Forget every token (the keys that verified them are no longer the keys)."""
        self._entries.clear()
