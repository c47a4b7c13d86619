"""The host side's thinking before launch: the pre-launch checks (preflight.py), the Plan
(plan.py: memory, compute, activations, DeepSpeed config), `parallelism.auto` (fit.py) and the
plan table. Torch-free at import.
"""
