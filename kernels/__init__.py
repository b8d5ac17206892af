"""Triton kernels of fastft, installed as ``fastft.kernels`` (never as a bare ``kernels`` package).

One file per op; each holds its Triton kernels, the ``torch.autograd.Function`` wrapper and a pure-torch reference.
"""
