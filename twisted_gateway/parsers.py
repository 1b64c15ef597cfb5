"""
Config value parsers: text in, value out, or ``ValueError`` with a short reason
(the caller names the file, section and key). Imports nothing of the project,
so every module that declares config keys can use them.
"""

from __future__ import annotations


def parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "yes", "true", "on"):
        return True
    if lowered in ("0", "no", "false", "off"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def parse_positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"expected a number of seconds, got {text!r}") from None
    if not value > 0 or value != value or value == float("inf"):
        raise ValueError(f"expected a positive number, got {text!r}")
    return value


def parse_non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"expected a number of seconds, got {text!r}") from None
    if value < 0 or value != value or value == float("inf"):
        raise ValueError(f"expected a number >= 0, got {text!r}")
    return value


def parse_positive_int(text: str) -> int:
    try:
        value = int(text.strip().replace("_", ""))
    except ValueError:
        raise ValueError(f"expected a whole number, got {text!r}") from None
    if value <= 0:
        raise ValueError(f"expected a number > 0, got {text!r}")
    return value


def parse_non_negative_int(text: str) -> int:
    try:
        value = int(text.strip().replace("_", ""))
    except ValueError:
        raise ValueError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise ValueError(f"expected a number >= 0, got {text!r}")
    return value


def parse_words(text: str) -> tuple[str, ...]:
    words = tuple(text.split())
    if not words:
        raise ValueError("expected at least one value")
    return words
