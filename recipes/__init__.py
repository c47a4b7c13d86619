"""Per-rank programs. Each is run as `python -m recipes.<task> <run_dir>/config.yaml`."""

from orchestrator.run.checkpoint import stop

stop.listen()  # before anything slow is imported: a stop signal during start-up is kept
