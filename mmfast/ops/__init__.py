"""Public mmfast ops. Each is a thin function over ``torch.ops.mmfast.<op>`` (so it works under
torch.compile, with fake tensors and autograd); kernels are chosen per device by the
dispatcher: C++ on CPU, Triton or CUDA C++ on CUDA (see mmfast._backend)."""

from mmfast.ops.bias_gelu import bias_gelu
from mmfast.ops.bipartite_merge import bipartite_merge
from mmfast.ops.cross_attention import cross_attention, key_attention_mass
from mmfast.ops.projector import projector
from mmfast.ops.projector_splice import projector_splice
from mmfast.ops.prune_tokens import prune_tokens

__all__ = ["bias_gelu", "bipartite_merge", "cross_attention", "key_attention_mass", "projector",
           "projector_splice", "prune_tokens"]
