"""Per-rank programs. Each is run as `python -m recipes.<task> <run_dir>/config.yaml`."""
