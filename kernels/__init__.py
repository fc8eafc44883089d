"""Triton kernels of sails_fast, installed as `sails_fast.kernels` (never as a top-level `kernels`).

Each op has a kernel module (`lora.py`) with its launchers and a plain PyTorch reference beside it
(`lora_ref.py`) that imports no triton. Importing this package imports nothing heavy.
"""
