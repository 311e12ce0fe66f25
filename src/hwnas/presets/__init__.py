"""Built-in search spaces (YAML), loadable by name: ``search run default``."""
