"""Declarative search spaces: dimensions, constraints, encode/decode, YAML load."""

from hwnas.spaces.loader import TRANSFORMS, load_space, preset_names, space_from_dict
from hwnas.spaces.space import Config, Dimension, Monotone, Space, config_hash

__all__ = ["TRANSFORMS", "Config", "Dimension", "Monotone", "Space", "config_hash", "load_space",
           "preset_names", "space_from_dict"]
