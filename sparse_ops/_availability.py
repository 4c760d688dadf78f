"""Cached probes for optional backends."""

from __future__ import annotations

import functools
import importlib.util

MINKOWSKI_INSTALL_HINT = (
    "the 'minkowski' backend needs MinkowskiEngine 0.5.4; build it for your torch with "
    "`python scripts/install_minkowski.py` (see README, 'MinkowskiEngine backend')"
)


@functools.cache
def minkowski_available() -> bool:
    """True when MinkowskiEngine can be found (it is imported only when the backend is built)."""
    return importlib.util.find_spec("MinkowskiEngine") is not None
