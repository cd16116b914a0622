"""Triton kernels of pydecouple, installed as ``pydecouple.kernels``.

Never import this folder as a top-level ``kernels`` package: setup.py maps it
to ``pydecouple.kernels``. Importing it needs Triton; ``pydecouple._backend``
catches the failure and says why the Triton backend cannot run.
"""

from .gated_conv2d import gated_conv2d_fwd, gated_conv2d_triton

__all__ = ["gated_conv2d_triton", "gated_conv2d_fwd"]
