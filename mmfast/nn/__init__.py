"""Thin nn.Modules over mmfast.ops: parameters and reshapes, no math of their own."""

from mmfast.nn.attention_pruner import AttentionPruner, PrunedTokens
from mmfast.nn.pooling import PixelShuffle, SpatialPool
from mmfast.nn.projector import Projector
from mmfast.nn.resampler import PerceiverResampler, Resampler
from mmfast.nn.token_merge import MergedTokens, TokenMerger

__all__ = ["AttentionPruner", "MergedTokens", "PerceiverResampler", "PixelShuffle", "Projector",
           "PrunedTokens", "Resampler", "SpatialPool", "TokenMerger"]
