"""From a raw mapping (YAML, overrides applied) to the typed `Config`: every key and value
checked against the dataclasses, errors naming the key with a "did you mean". The config's
`imports` are imported first, so that a plug-in router's section is known when it is read."""
from __future__ import annotations

import dataclasses
import difflib
import importlib
import math
import os
import sys
import types
import typing
from typing import Any

from llm.config.errors import ConfigError, check_choice
from llm.config.migration import flat_names_of
from llm.config.routing import DEFAULT_ROUTER, RoutingConfig, router_section
from llm.config.schema import Config


def from_dict(raw: dict[str, Any]) -> Config:
    import_modules(_coerce(list[str], raw.get("imports", []), "imports"))
    return _build(Config, raw, "")


def import_modules(modules: typing.Sequence[str]) -> None:
    """Import the config's `imports`, the current directory first on the search path."""
    if modules and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise ConfigError(f"imports: cannot import {module} ({err})") from None


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        full = f"{prefix}{key}"
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else f"; valid keys: {', '.join(sorted(fields))}"
            raise ConfigError(f"unknown key {full}{hint}")
        kwargs[key] = _coerce(hints[key], value, full)
    return cls(**kwargs)


def build_routing(raw: Any, prefix: str) -> RoutingConfig:
    """model.routing: the shared keys, and the section of the chosen router only."""
    from llm.routing import registry

    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.')}: expected a mapping, got {raw!r}")
    router = _coerce(str, raw.get("router", DEFAULT_ROUTER), f"{prefix}router")
    check_choice(f"{prefix}router", router, registry.names())
    shared = {f.name for f in dataclasses.fields(RoutingConfig)} - {"options"}
    section = registry.get(router).options
    for key in raw:
        if key in shared or key == router and section is not None:
            continue
        if key == router:
            raise ConfigError(f"{prefix}{key}: router {key} has no options of its own")
        if key in registry.names():
            raise ConfigError(f"{prefix}{key}: options of router {key}, but {prefix}router is {router}")
        raise ConfigError(f"unknown key {prefix}{key}{_routing_hint(key, prefix, shared, router)}")
    cfg = _build(RoutingConfig, {k: v for k, v in raw.items() if k in shared}, prefix)
    if router in raw:
        cfg.options = _build(section, raw[router], f"{prefix}{router}.")
    return cfg


def _coerce(tp: Any, value: Any, key: str) -> Any:
    if tp is RoutingConfig:
        return build_routing(value, key + ".")
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key + ".")
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(args[0], value, key)
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, (str, int, float)):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r}: expected a list")
        return [_coerce(item, v, key) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r}: expected true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}={value!r}: expected an integer")
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        raise ConfigError(f"{key}={value!r}: expected a number")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}={value!r}: expected a string")
    raise ConfigError(f"{key}: unsupported type {tp}")


def _routing_hint(key: str, prefix: str, shared: set[str], router: str) -> str:
    """Where an unknown model.routing key belongs: a router's section, or a close valid key."""
    from llm.routing import registry

    owners = [name for name in registry.names() if key in flat_names_of(name)]
    if owners:
        return f"; it is an option of router {', '.join(owners)}: {prefix}{owners[0]}.{flat_names_of(owners[0])[key]}"
    valid = shared | ({router} if router_section(router) is not None else set())
    close = difflib.get_close_matches(str(key), valid, n=1)
    return f"; did you mean {prefix}{close[0]}?" if close else f"; valid keys: {', '.join(sorted(valid))}"
