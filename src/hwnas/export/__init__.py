"""Export a chosen point as safetensors + manifest; load it back."""

from hwnas.export.exporter import export_model, load, read_manifest

__all__ = ["export_model", "load", "read_manifest"]
