"""One-line config errors, and the checks of single values that raise them."""
from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A config problem, phrased as one line that names the key."""


def check_positive(key: str, value: int) -> None:
    if value <= 0:
        raise ConfigError(f"{key}={value}: expected a positive number")


def check_choice(key: str, value: Any, options: tuple) -> None:
    if value not in options:
        raise ConfigError(f"{key}={value!r}: expected one of {', '.join(map(str, options))}")
