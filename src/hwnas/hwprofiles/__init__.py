"""Hardware: how a device is measured (``latency``: warm-up, median and spread, CUDA events and
graphs; ``energy``: NVML's total-energy counter or RAPL), and the device's name."""
