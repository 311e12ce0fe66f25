"""Hardware: how a device is measured (``latency``: warm-up, median and spread, CUDA events and
graphs, on the CPU with ``allocator`` keeping freed memory; ``energy``: NVML's total-energy
counter or RAPL), the device's name, hardware profiles (``profile``: shipped spec YAML files and
``measure_profile`` for this machine), the roofline ``predictor`` that prices a model on a
profile, and the study's fitted ``cost_model``."""
