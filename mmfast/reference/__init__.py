"""Plain-PyTorch references: the meaning of every mmfast op. Tests and benchmarks compare the
fast kernels against these; nothing here is tuned for speed."""

from mmfast.reference.bias_gelu import bias_gelu

__all__ = ["bias_gelu"]
from mmfast.reference.cross_attention import cross_attention, key_attention_mass  # noqa: E402

__all__ += ["cross_attention", "key_attention_mass"]
