"""Plain-PyTorch references: the meaning of every mmfast op. Tests and benchmarks compare the
fast kernels against these; nothing here is tuned for speed."""

from mmfast.reference.bias_gelu import bias_gelu
from mmfast.reference.projector import projector, projector_splice

__all__ = ["bias_gelu", "projector", "projector_splice"]
