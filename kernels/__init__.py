"""Triton kernels, installed as mmfast.kernels. Each module registers the configurations it
launches for the ahead-of-time compile check (mmfast.kernels.aot)."""
