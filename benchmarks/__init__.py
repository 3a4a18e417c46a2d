"""Benchmarks a user can run: the input pipeline, the model step, and both together."""
