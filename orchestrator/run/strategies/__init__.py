"""Parallelism strategies: each module has one `setup(model, job, device) -> Engine`
(chosen in run/setup.py).
"""
