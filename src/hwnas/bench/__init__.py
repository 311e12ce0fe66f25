"""Benchmarks run by ``search bench NAME --json FILE``; each module measures one thing side by side."""
