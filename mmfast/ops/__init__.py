"""Public mmfast ops. Each is a thin function over ``torch.ops.mmfast.<op>`` (so it works under
torch.compile, with fake tensors and autograd); kernels are chosen per device by the
dispatcher: C++ on CPU, Triton or CUDA C++ on CUDA (see mmfast._backend)."""

from mmfast.ops.bias_gelu import bias_gelu
from mmfast.ops.projector import projector
from mmfast.ops.projector_splice import projector_splice

__all__ = ["bias_gelu", "projector", "projector_splice"]
