"""Thin nn.Modules over mmfast.ops: parameters and reshapes, no math of their own."""
