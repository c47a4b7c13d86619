"""Torch-free contracts both sides share: errors, secrets, the run directory's files and the
environment variables (contract.py), the Plan type, checkpoints on disk, atomic writes, the
cache root, the lifeline. Imports nothing else of the project.
"""
