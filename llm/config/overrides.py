"""Command-line overrides: `key.path=value` arguments applied to a raw config mapping."""
from __future__ import annotations

import typing
from typing import Any

import yaml

from llm.config.errors import ConfigError


def apply_overrides(raw: dict[str, Any], overrides: typing.Sequence[str]) -> None:
    """Set each `a.b=value` of `overrides` in `raw`, creating sections on the way."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key.path=value")
        _set_dotted(raw, key.strip(), parse_override_value(key.strip(), value))


def parse_override_value(key: str, text: str) -> Any:
    """A command-line value as YAML, except that `[...]` is split on its top-level commas
    itself: YAML reads the brackets of a glob inside a list (`[a/x-0[0-2].gz]`) as nesting."""
    stripped = text.strip()
    if not stripped:
        return ""
    if stripped.startswith("[") and stripped.endswith("]"):
        return [_scalar(item) for item in _split_top_level(stripped[1:-1])]
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"override {key}={text}: not valid YAML ({' '.join(str(err).split())})") from None


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are outside brackets and quotes."""
    items, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(text):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    items.append(text[start:])
    return [item.strip() for item in items if item.strip()]


def _scalar(item: str) -> Any:
    """One list item: a YAML scalar (number, bool, quoted string) or else the text as written."""
    try:
        value = yaml.safe_load(item)
    except yaml.YAMLError:
        return item
    return item if isinstance(value, (list, dict)) or value is None else value


def _set_dotted(raw: dict, key: str, value: Any) -> None:
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: {part} is a value, not a section")
        node = child
    node[parts[-1]] = value
