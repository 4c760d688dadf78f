"""Name -> constructor registry for model variants (timm's pattern, without pretrained configs)."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

_MODEL_ENTRYPOINTS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register ``fn`` under its ``__name__``."""
    if fn.__name__ in _MODEL_ENTRYPOINTS:
        raise ValueError(f"model {fn.__name__!r} registered twice")
    _MODEL_ENTRYPOINTS[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    """Registered model names, sorted."""
    return sorted(_MODEL_ENTRYPOINTS)


def model_entrypoint(name: str) -> Callable[..., nn.Module]:
    """The constructor of ``name``; ValueError naming the known models otherwise."""
    try:
        return _MODEL_ENTRYPOINTS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(list_models())}") from None
