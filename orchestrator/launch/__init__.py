"""Turning a Plan into processes: local torchrun, multi-node torchrun commands, Slurm, a
Kubernetes PyTorchJob manifest; the run directory (lock, marker, reuse).
"""
