"""Sample inputs of key_attention_mass: the cross_attention samples without v."""

import torch

from tests.helpers import SampleInput
from tests.samples import cross_attention


def sample_inputs(device="cpu", dtype=torch.float32, requires_grad=False):
    return [SampleInput(s.args[:2], s.kwargs, s.name)
            for s in cross_attention.sample_inputs(device, dtype, requires_grad=False)]
