"""Sparse execution backends for the masked ConvNeXt V2 encoder.

``get_backend(name)`` returns a :class:`SparseBackend`; the choice is made once, when a model is
built. ``"auto"`` picks the fastest available backend (``native``, always present).
"""

from __future__ import annotations

from sparse_ops._availability import MINKOWSKI_INSTALL_HINT, minkowski_available
from sparse_ops.base import GRN_SCOPES, SparseBackend
from sparse_ops.dense import DenseMaskedBackend
from sparse_ops.native import NativeSparseBackend

BACKENDS = ("auto", "native", "dense", "minkowski")

__all__ = [
    "BACKENDS",
    "GRN_SCOPES",
    "DenseMaskedBackend",
    "NativeSparseBackend",
    "SparseBackend",
    "available_backends",
    "get_backend",
    "minkowski_available",
]


def available_backends() -> list[str]:
    """Names of the concrete backends that can be built here, fastest first."""
    names = ["native", "dense"]
    if minkowski_available():
        names.append("minkowski")
    return names


def get_backend(name: str | SparseBackend = "auto", grn_scope: str = "sample") -> SparseBackend:
    """Build a backend by name.

    Args:
        name: ``"auto"``, ``"native"``, ``"dense"`` or ``"minkowski"``, or a backend instance
            (returned unchanged).
        grn_scope: ``"sample"`` or ``"batch"``; see :mod:`sparse_ops.base`.

    Raises:
        ValueError: unknown name.
        ImportError: ``"minkowski"`` requested but MinkowskiEngine is not installed.
    """
    if isinstance(name, SparseBackend):
        return name
    if name in ("auto", "native"):
        return NativeSparseBackend(grn_scope)
    if name == "dense":
        return DenseMaskedBackend(grn_scope)
    if name == "minkowski":
        if not minkowski_available():
            raise ImportError(MINKOWSKI_INSTALL_HINT)
        from sparse_ops.minkowski import MinkowskiBackend

        return MinkowskiBackend(grn_scope)
    raise ValueError(f"unknown sparse backend {name!r}; choose one of {BACKENDS}")
