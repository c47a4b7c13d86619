"""Saving models and training state: the final Hugging Face model (`final.py`); periodic,
resumable, sharded checkpoints (`periodic.py`); checkpoint-and-stop on a signal (`stop.py`);
export of a checkpoint as a Hugging Face model (`export.py`). Import the module you need: this
package imports nothing, so a rank can listen for the stop signal before it imports torch."""
