"""Model converters applied before a strategy wraps the model, in one documented order
(converters.py), and `torch.compile` of the blocks (compile.py).
"""
