"""Models built from transformers config classes, their parameter shapes (and the on-disk
cache of them), LoRA, the DPO pair, model-directory checks, tensor storage bytes.
"""
