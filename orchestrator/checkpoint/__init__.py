"""Saving models and training state: the final Hugging Face model (`final.py`) and periodic,
resumable, sharded checkpoints (`periodic.py`)."""

from orchestrator.checkpoint.final import ADAPTER_DIR, MODEL_DIR, TOKENIZER_FILE, save_final

__all__ = ["ADAPTER_DIR", "MODEL_DIR", "TOKENIZER_FILE", "save_final"]
