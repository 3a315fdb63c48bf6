"""Plain-PyTorch references: the meaning of every mmfast op. Tests and benchmarks compare the
fast kernels against these; nothing here is tuned for speed."""

from mmfast.reference.bias_gelu import bias_gelu
from mmfast.reference.bipartite_merge import bipartite_merge
from mmfast.reference.cross_attention import cross_attention, key_attention_mass
from mmfast.reference.projector import projector, projector_splice
from mmfast.reference.prune_tokens import prune_tokens

__all__ = ["bias_gelu", "bipartite_merge", "cross_attention", "key_attention_mass", "projector",
           "projector_splice", "prune_tokens"]
