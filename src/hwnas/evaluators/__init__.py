"""Candidate -> metrics: accuracy, fidelity, FLOPs, parameters, latency and energy, in-process or on Ray actors."""
