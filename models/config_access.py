"""Config access and validation shared by every model family (torch and the stdlib only).

A model config is duck-typed: a dataclass, an OmegaConf node, a SimpleNamespace or a plain dict,
with nested groups (``cfg.vq``, ``cfg.ladder``, ``cfg.factor``, ...) read the same way. Nothing
here imports omegaconf or collections: mappings are recognised by their methods.
"""

from __future__ import annotations

import numbers
from typing import Any, Callable

import torch

from models.likelihoods import build_likelihood


def is_mapping(value: Any) -> bool:
    """True for dicts and OmegaConf DictConfigs (duck-typed: keys, __getitem__, get)."""
    return hasattr(value, "keys") and hasattr(value, "__getitem__") and hasattr(value, "get")


def to_plain(value: Any) -> Any:
    """Recursively turn mappings / sequences (OmegaConf nodes included) into dicts and lists."""
    if value is None or isinstance(value, (str, bytes, torch.Tensor)):
        return value
    if is_mapping(value):
        return {str(k): to_plain(value[k]) for k in value.keys()}
    if isinstance(value, (list, tuple)) or type(value).__name__ == "ListConfig":
        return [to_plain(v) for v in value]
    return value


def cfg_get(cfg: Any, key: str, default: Any = None) -> Any:
    """``cfg.key`` for dataclasses / namespaces / OmegaConf nodes, ``cfg[key]`` for mappings.

    Missing keys and None give ``default``; works on nested groups (``cfg_get(cfg, "factor")``).
    """
    if cfg is None:
        return default
    value = cfg.get(key) if is_mapping(cfg) else getattr(cfg, key, None)
    return default if value is None else value


def resolve_flavor(cfg: Any, flavors: dict[str, dict[str, Any]], family: str) -> dict[str, Any]:
    """The preset of ``cfg.flavor`` (default ``base``); unknown flavors raise naming the key."""
    flavor = cfg_get(cfg, "flavor") or "base"
    if flavor not in flavors:
        raise ValueError(
            f"unknown model.flavor {flavor!r} for {family}; choose one of: {', '.join(flavors)}"
        )
    return flavors[flavor]


def _pick(value: Any, flavored: Any) -> Any:
    """The flavor rule for one field: absent (None) -> the flavor's value; any given value wins."""
    value = to_plain(value)
    return flavored if value is None else value


def resolve_flavored(
    cfg: Any, defaults: dict[str, Any], preset: dict[str, Any]
) -> dict[str, Any]:
    """defaults < preset < any field the cfg sets (not None), even one equal to its default.

    A key of ``defaults`` whose default is a dict is a nested group (read as an object or a
    dict) resolved field by field against ``preset[key]``. Fields of ``cfg`` not in
    ``defaults`` are ignored.
    """
    resolved: dict[str, Any] = {}
    for key, default in defaults.items():
        value = cfg_get(cfg, key)
        if isinstance(default, dict):
            group_preset = preset.get(key, {})
            resolved[key] = {
                k: _pick(cfg_get(value, k), group_preset.get(k, d)) for k, d in default.items()
            }
        else:
            resolved[key] = _pick(value, preset.get(key, default))
    return resolved


def resolve_family_config(
    cfg: Any, base: dict[str, Any], flavors: dict[str, dict[str, Any]], family: str
) -> dict[str, Any]:
    """Constructor kwargs from a duck-typed model config, nested groups included.

    Precedence: base defaults < flavor preset < any field the config sets. A field left
    unset (None) takes the flavor's value (this is how ``flavor=debug`` shrinks widths
    without the pipeline knowing them); an explicit value always wins, even one equal to the
    base default (``flavor=debug latent_dim=128`` gives 128). Unknown fields are ignored:
    the pipeline's ModelConfig carries every family's fields.
    """
    return resolve_flavored(cfg, base, resolve_flavor(cfg, flavors, family))


def check_positive_ints(family: str | None, /, **values: Any) -> None:
    """Raise ``model.<key> must be a positive integer[ for <family>], got ...`` for the first bad value."""
    suffix = f" for {family}" if family else ""
    for key, value in values.items():
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
            raise ValueError(f"model.{key} must be a positive integer{suffix}, got {value!r}")


def make_likelihood(
    name: str, obs_std: float, components: int, channels: int, build: Callable[..., Any] | None = None
):
    """``build`` (default ``models.likelihoods.build_likelihood``) with whatever extra arguments it accepts.

    Returns (likelihood, params_per_channel); likelihoods without ``params_per_channel`` emit
    one decoder channel per image channel.
    """
    build = build_likelihood if build is None else build
    code = getattr(build, "__code__", None)
    accepted = code.co_varnames[: code.co_argcount + code.co_kwonlyargcount] if code else ()
    extra = {
        k: v
        for k, v in {
            "logistic_components": components, "num_components": components,
            "components": components, "channels": channels, "in_channels": channels,
        }.items()
        if k in accepted
    }
    likelihood = build(name, obs_std, **extra)
    return likelihood, int(getattr(likelihood, "params_per_channel", 1))
