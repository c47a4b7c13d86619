"""orchestrator: one YAML → validated plan → distributed training run → W&B."""

__version__ = "0.1.0"
