"""hwnas: hardware-aware search that compresses Vision Transformers."""

from __future__ import annotations

__version__ = "0.3.0"


def load(path):
    """Rebuild an exported model (``search export ... -o PATH``) as a runnable ``torch.nn.Module``."""
    from hwnas.export.exporter import load as _load

    return _load(path)
