"""Thin nn.Modules over mmfast.ops: parameters and reshapes, no math of their own."""

from mmfast.nn.pooling import PixelShuffle, SpatialPool
from mmfast.nn.token_merge import MergedTokens, TokenMerger

__all__ = ["MergedTokens", "PixelShuffle", "SpatialPool", "TokenMerger"]
