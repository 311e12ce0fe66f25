"""Where hwnas keeps things on disk."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """The user cache directory (``$HWNAS_CACHE_DIR`` overrides it), created on demand."""
    if override := os.environ.get("HWNAS_CACHE_DIR"):
        path = Path(override)
    else:  # imported here: a machine given only HWNAS_CACHE_DIR needs no platformdirs (the lent GPU machine)
        import platformdirs

        path = Path(platformdirs.user_cache_dir("hwnas"))
    path.mkdir(parents=True, exist_ok=True)
    return path
