"""Where hwnas keeps things on disk."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs


def cache_dir() -> Path:
    """The user cache directory (``$HWNAS_CACHE_DIR`` overrides it), created on demand."""
    path = Path(os.environ.get("HWNAS_CACHE_DIR") or platformdirs.user_cache_dir("hwnas"))
    path.mkdir(parents=True, exist_ok=True)
    return path
