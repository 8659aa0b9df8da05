"""Saved configs of earlier versions, brought to today's schema before they are built.

A checkpoint keeps the config it was trained with; keys removed since then are dropped,
and routing options that were flat under model.routing move into their router's section.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from llm.config.routing import DEFAULT_ROUTER, RoutingConfig, router_section


# Keys that saved configs of earlier versions hold and that no longer exist.
_REMOVED_KEYS = (("model", "routing", "calibrate_tau"), ("data", "streaming"))


def migrate_saved(raw: dict[str, Any]) -> dict[str, Any]:
    """A saved config of any earlier version in today's schema: removed keys dropped, and
    the flat routing keys of configs from before the router sections (every router's
    options directly under model.routing) moved into the chosen router's section."""
    for *sections, key in _REMOVED_KEYS:
        node = raw
        for section in sections:
            node = node.get(section) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(key, None)
    routing = raw.get("model", {}).get("routing") if isinstance(raw.get("model"), dict) else None
    if isinstance(routing, dict):
        raw["model"]["routing"] = _migrate_flat_routing(routing)
    return raw


def _migrate_flat_routing(routing: dict[str, Any]) -> dict[str, Any]:
    """Flat options → `<router>: {...}`; the other routers' flat options (earlier versions saved
    all of them) are dropped. Keys no router knows stay, so that loading names them."""
    from llm.routing import registry

    shared = {f.name for f in dataclasses.fields(RoutingConfig)} - {"options"}
    names = registry.names()
    if all(key in shared or key in names for key in routing):
        return routing
    router = routing.get("router", DEFAULT_ROUTER)
    out = {key: value for key, value in routing.items() if key in shared or key in names}
    own = out.setdefault(router, {}) if router_section(router) is not None else {}
    for name in names:
        for old, new in flat_names_of(name).items():
            if old in routing and name == router:
                own[new] = routing[old]
    known = {old for name in names for old in flat_names_of(name)}
    out.update({key: value for key, value in routing.items() if key not in out and key not in known})
    return out


def flat_names_of(router: str) -> dict[str, str]:
    """Flat key of an earlier version → field of `router`'s section."""
    section = router_section(router)
    if section is None:
        return {}
    return {**{f.name: f.name for f in dataclasses.fields(section)}, **section.flat_names}
