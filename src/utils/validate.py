"""Checks of config values that raise a ValueError naming the config key."""

from __future__ import annotations

from typing import Any


def check_int(value: Any, key: str, minimum: int, allow_none: bool = False, hint: str = "") -> Any:
    """``value`` if it is an int >= ``minimum`` (or None where ``allow_none``), else a ValueError naming ``key``.

    Bools and floats (also 2.0) are refused: a config value that is not an integer is a typo, not a request.
    ``hint`` ends the message (what the value means, what to use instead).
    """
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        allowed = "null or an integer" if allow_none else "an integer"
        raise ValueError(f"{key} must be {allowed} >= {minimum}, got {value!r}" + (f" ({hint})" if hint else ""))
    return value


def positive_int(value: Any, key: str, allow_none: bool = False, hint: str = "") -> Any:
    """``value`` if it is an int >= 1 (or None where ``allow_none``), else a ValueError naming ``key``."""
    return check_int(value, key, 1, allow_none=allow_none, hint=hint)
