"""flashtune's tuner: the config space, the benchmark harness, the tuning loop and the CLI."""
