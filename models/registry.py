"""Name -> model class registry.

The pipeline only knows a model by ``cfg.name``; families register themselves on import of
``models`` so adding a family never touches pipeline code.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Callable, TypeVar

_REGISTRY: dict[str, type] = {}

T = TypeVar("T", bound=type)


def register_model(name: str) -> Callable[[T], T]:
    """Class decorator registering a model family under ``name``.

    The class must define a classmethod ``from_config(cfg)``. The registered name is stored on
    the class as ``model_name``. Raises ValueError if ``name`` is already taken, so two families
    can never silently shadow each other.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"model name must be a non-empty string, got {name!r}")

    def decorator(cls: T) -> T:
        if name in _REGISTRY:
            raise ValueError(
                f"model name '{name}' is already registered by "
                f"{_REGISTRY[name].__module__}.{_REGISTRY[name].__qualname__}; pick another name"
            )
        if not callable(getattr(cls, "from_config", None)):
            raise TypeError(f"{cls.__qualname__} needs a classmethod from_config(cfg) to be registered")
        cls.model_name = name
        _REGISTRY[name] = cls
        return cls

    return decorator


def list_models() -> list[str]:
    """Return the registered model names, sorted."""
    return sorted(_REGISTRY)


def _family(cfg: Any) -> tuple[type, Any]:
    if isinstance(cfg, dict):
        cfg = SimpleNamespace(**cfg)
    name = getattr(cfg, "name", None)
    if name not in _REGISTRY:
        registered = ", ".join(list_models()) or "(none)"
        raise ValueError(
            f"unknown model '{name}'; registered: {registered}. Set model.name to one of these."
        )
    return _REGISTRY[name], cfg


def resolve_model_config(cfg: Any) -> dict[str, Any]:
    """The constructor arguments ``build_model(cfg)`` would use (flavor applied), without building.

    Families without a ``resolve_config`` classmethod give an empty dict.
    """
    cls, cfg = _family(cfg)
    resolve = getattr(cls, "resolve_config", None)
    return dict(resolve(cfg)) if callable(resolve) else {}


def objective_name(cfg: Any) -> str:
    """The name of the quantity ``-forward(x)["elbo"]`` is for this config's family.

    ``neg_elbo`` (a bound on -log p(x) in nats: the default), ``neg_objective`` (a training
    objective that is not a bound, e.g. with encoder->decoder skips) or ``code_nll`` (a
    second-stage prior's negative log-likelihood of discrete codes). Only equal names compare.
    """
    cls, cfg = _family(cfg)
    rule = getattr(cls, "objective_of", None)
    return rule(resolve_model_config(cfg)) if callable(rule) else "neg_elbo"


def family_default(name: str, attribute: str, default: Any) -> Any:
    """A family's class-level default for a pipeline setting (e.g. ``default_ema_rate``), or
    ``default`` for families that declare none (and for unknown names, refused elsewhere)."""
    cls = _REGISTRY.get(name)
    return getattr(cls, attribute, default) if cls is not None else default


def build_model(cfg: Any):
    """Build the model named ``cfg.name`` from a config object.

    ``cfg`` is duck-typed: a dataclass, an OmegaConf node, a SimpleNamespace, or a plain dict
    (wrapped for attribute access). Raises ValueError naming the registered models when the
    name is unknown.
    """
    cls, cfg = _family(cfg)
    return cls.from_config(cfg)
