"""Thin nn.Modules over mmfast.ops: parameters and reshapes, no math of their own."""

from mmfast.nn.projector import Projector  # noqa: E402

__all__ = ["Projector"]
