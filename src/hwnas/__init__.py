"""hwnas: hardware-aware search that compresses Vision Transformers."""

__version__ = "0.1.0"
