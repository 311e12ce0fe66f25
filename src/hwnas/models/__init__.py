"""Model adapters: the built-in digits models and the timm/checkpoint factory."""
