"""Benchmarking: the providers, the CSV schema, one-shape measurement, plots and the Nsight profiler."""
