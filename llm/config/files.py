"""Config files: an experiment's YAML read with overrides, a checkpoint's saved config read
back (any earlier version), and a config written as YAML."""
from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any

import yaml

from llm.config.errors import ConfigError
from llm.config.migration import migrate_saved
from llm.config.overrides import apply_overrides
from llm.config.parse import from_dict
from llm.config.routing import RoutingConfig
from llm.config.schema import Config


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Read a YAML experiment, apply `a.b=value` overrides, check every key and value."""
    raw: dict[str, Any] = _read_yaml(path) if path is not None else {}
    raw.setdefault("name", Path(path).stem if path is not None else "run")
    apply_overrides(raw, overrides)
    return from_dict(raw).validate()


def load_saved_config(path: str | Path) -> Config:
    """A checkpoint's config.yaml, written by this version or an earlier one (`migrate_saved`)."""
    raw = _read_yaml(path)
    raw.setdefault("name", Path(path).stem)
    return from_dict(migrate_saved(raw)).validate()


def _read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(err).split())})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return raw


def to_dict(cfg: Any) -> dict[str, Any]:
    """A config (or one of its sections) as YAML writes it: the router's options under the router's name."""
    return _sections_by_name(cfg, dataclasses.asdict(cfg))


def _sections_by_name(cfg: Any, out: dict[str, Any]) -> dict[str, Any]:
    if isinstance(cfg, RoutingConfig):
        options = out.pop("options")
        return {**out, cfg.router: options} if options is not None else out
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out[f.name] = _sections_by_name(value, out[f.name])
    return out


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
