"""
Revoked tokens, as the gateway holds them in memory.

The per-message path and the per-request path never ask Redis: every worker
keeps the current revocations here (loaded at start and after each reconnect,
updated by the cluster's control channel) and checks a verified token's claims
against them. Pure: claims and times in, answers out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping


@dataclass
class Revocations:
    """Tokens revoked by ``jti`` (until their expiry) and by subject issued before a time."""

    #: jti -> unix time after which the entry may go (the token's exp + leeway)
    jtis: dict[str, float] = field(default_factory=dict)
    #: sub -> tokens of this subject issued before this unix time are revoked
    subjects: dict[str, float] = field(default_factory=dict)

    def add_jti(self, jti: str, until: float) -> None:
        self.jtis[jti] = max(until, self.jtis.get(jti, until))

    def add_subject(self, sub: str, before: float) -> None:
        self.subjects[sub] = max(before, self.subjects.get(sub, before))

    def replace(self, other: "Revocations") -> None:
        """The state loaded from Redis, plus what arrived meanwhile (a revocation is never lost)."""
        for jti, until in other.jtis.items():
            self.add_jti(jti, until)
        for sub, before in other.subjects.items():
            self.add_subject(sub, before)

    def prune(self, now: float) -> None:
        """Forget jtis whose tokens have expired anyway."""
        for jti in [j for j, until in self.jtis.items() if until <= now]:
            del self.jtis[jti]

    def revoked(self, claims: Mapping[str, object]) -> str | None:
        """Which revocation covers a verified token with these claims (``jti``, ``sub``), if any."""
        if not self.jtis and not self.subjects:
            return None  # (nothing revoked: no claim to look up)
        jti = claims.get("jti")
        if isinstance(jti, str) and jti in self.jtis:
            return "jti"
        sub = claims.get("sub")
        if isinstance(sub, str) and sub in self.subjects and issued_before(claims, self.subjects[sub]):
            return "sub"
        return None


def issued_before(claims: Mapping[str, object], before: float) -> bool:
    """
    A token of a revoked subject is revoked when issued before ``before``;
    one without a usable ``iat`` cannot prove it is newer, so it is revoked.
    """
    iat = claims.get("iat")
    if isinstance(iat, bool) or not isinstance(iat, (int, float)):
        return True
    return iat < before


def matches(claims: Mapping[str, object], *, jti: str | None = None, sub: str | None = None,
            before: float | None = None) -> bool:
    """Whether one revocation (a jti, or a subject before a time) covers a token's claims."""
    if jti is not None:
        return claims.get("jti") == jti
    if sub is not None and claims.get("sub") == sub:
        return before is None or issued_before(claims, before)
    return False
