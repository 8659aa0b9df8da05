"""model.routing: the keys every router shares, and the base of a router's own section."""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

from llm.config.errors import ConfigError, check_choice, check_positive

if TYPE_CHECKING:
    from llm.config.schema import ModelConfig

DEFAULT_ROUTER = "dense"  # the baseline without routed layers (llm/routing/dense.py)


class RouterOptions:
    """Base of a router's own section, `model.routing.<router>` (a dataclass in the router's module).

    `flat_names` maps the keys that checkpoints from before the sections (all routing keys
    flat under model.routing) used for this section's fields, where the name changed.
    """

    flat_names: typing.ClassVar[dict[str, str]] = {}

    def validate(self, model: "ModelConfig", key: str) -> None:
        """Check the section against the model (`key` is model.routing.<router>)."""

    def validate_seq_len(self, seq_len: int, key: str) -> None:
        """Check the section against the training sequence length (data.seq_len)."""


@dataclass
class RoutingConfig:
    """Which FFN each block gets (docs/routing.md#router-contract): `router` names a registered
    router (`llm.routing.registry`); the keys here are shared by every router, the router's own
    options are its section `model.routing.<router>` (`options`). `router: dense` means no routing."""

    router: str = DEFAULT_ROUTER
    n_experts: int = 8
    d_expert: int = 0  # hidden size of one expert; 0 = model.d_ff
    every: int = 1  # route every n-th block (blocks every-1, 2*every-1, ...), dense elsewhere
    capacity_factor: Optional[float] = None  # the dispatcher's expert capacity; None = dropless
    aux_loss_coef: float = 0.01  # Switch load-balancing loss
    z_loss_coef: float = 0.001  # ST-MoE router z-loss
    options: Optional[RouterOptions] = None  # model.routing.<router>; None = the section's defaults

    def __post_init__(self) -> None:
        if self.options is None:
            section = router_section(self.router)
            self.options = section() if section is not None else None

    @classmethod
    def build(cls, router: str, **keys: Any) -> "RoutingConfig":
        """A routing config from shared keys and the router's own, in one call (tests, scripts)."""
        from llm.config.parse import build_routing  # parse builds RoutingConfig: it imports this module

        return build_routing(routing_section(router, **keys), "model.routing.")

    @property
    def routed(self) -> bool:
        """False for the dense baseline: no block is routed."""
        from llm.routing import registry

        return registry.get(self.router).routed

    @property
    def section_key(self) -> str:
        return f"model.routing.{self.router}"

    def validate(self, model: "ModelConfig") -> None:
        from llm.routing import registry

        check_choice("model.routing.router", self.router, registry.names())
        if not self.routed:
            return
        check_positive("model.routing.n_experts", self.n_experts)
        check_positive("model.routing.every", self.every)
        if self.d_expert < 0:
            raise ConfigError(f"model.routing.d_expert={self.d_expert}: expected >= 0 "
                              f"(0 means model.d_ff={model.d_ff})")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise ConfigError(f"model.routing.capacity_factor={self.capacity_factor}: expected > 0, or null for dropless")
        if self.options is not None:
            self.options.validate(model, self.section_key)


def routing_section(router: str, **keys: Any) -> dict[str, Any]:
    """model.routing as YAML holds it, from shared keys and the router's own mixed: the latter
    go into the section `<router>` (a key named `<router>` may also hold some of them)."""
    shared = {f.name for f in dataclasses.fields(RoutingConfig)} - {"router", "options"}
    own = {**keys.pop(router, {}), **{k: v for k, v in keys.items() if k not in shared}}
    raw = {"router": router, **{k: v for k, v in keys.items() if k in shared}}
    return {**raw, router: own} if own else raw


def router_section(router: str) -> Optional[type]:
    """The dataclass of `router`'s own section, or None (no options, or not a registered router)."""
    from llm.routing import registry

    try:
        return registry.get(router).options
    except KeyError:
        return None

