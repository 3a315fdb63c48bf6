"""mmfast.ops.key_attention_mass on CPU against probabilities from the reference."""

import pytest
import torch

import mmfast
from mmfast import reference as R
from mmfast.reference.cross_attention import allowed_mask
from tests.helpers import DTYPES, assert_close, sample_inputs

# Mass sums up to Hq * Lq probabilities; compare relative to the largest mass.
RTOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-3}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference_probabilities(dtype):
    for s in sample_inputs("key_attention_mass", dtype=dtype):
        q, k = s.args
        mass = mmfast.ops.key_attention_mass(q, k, **s.kwargs)
        ref = R.key_attention_mass(q.double(), k.double(), **s.kwargs)
        assert mass.dtype == torch.float32 and mass.shape == (q.shape[0], k.shape[1])
        scale = max(ref.abs().max().item(), 1.0)
        assert_close(mass, ref, atol=RTOL[dtype] * scale, rtol=0, name=s.name)


def test_total_mass_counts_attending_queries():
    # Each query row with an allowed key distributes exactly 1 per head.
    q = torch.randn(2, 50, 4, 40)
    k = torch.randn(2, 30, 2, 40)
    q_media = torch.randint(0, 3, (2, 50))
    kv_media = torch.randint(0, 3, (2, 30))
    for mode in ("immediate", "previous"):
        mass = mmfast.ops.key_attention_mass(q, k, q_media=q_media, kv_media=kv_media,
                                             media_mode=mode)
        rows = allowed_mask(2, 50, 30, q_media=q_media, kv_media=kv_media,
                            media_mode=mode).any(-1).sum(-1)
        assert_close(mass.sum(-1), 4.0 * rows.double(), atol=1e-3, rtol=1e-5)
        never = ~allowed_mask(2, 50, 30, q_media=q_media, kv_media=kv_media,
                              media_mode=mode).any(1)  # keys no query may attend
        assert (mass[never] == 0).all()


def test_opcheck():
    for s in sample_inputs("key_attention_mass"):
        if s.args[0].shape[1] > 200:
            continue
        torch.library.opcheck(torch.ops.mmfast.key_attention_mass.default, s.args, s.kwargs)


def test_compile_fullgraph():
    s = sample_inputs("key_attention_mass")[3]
    f = torch.compile(mmfast.ops.key_attention_mass, fullgraph=True)
    assert torch.equal(f(*s.args, **s.kwargs), mmfast.ops.key_attention_mass(*s.args, **s.kwargs))


@pytest.mark.parametrize("kwargs,match", [
    ({"media_mode": "all"}, "media_mode"),
    ({"kv_lens": torch.tensor([9, 1])}, "kv_lens"),
    ({"q_media": torch.ones(2, 5, dtype=torch.long)}, "kv_media"),
], ids=["mode", "kv_lens", "media pair"])
def test_bad_input(kwargs, match):
    q, k = torch.randn(2, 5, 2, 32), torch.randn(2, 7, 2, 32)
    with pytest.raises((ValueError, RuntimeError), match=match):
        mmfast.ops.key_attention_mass(q, k, **kwargs)
    with pytest.raises((ValueError, RuntimeError), match="number of q heads"):
        mmfast.ops.key_attention_mass(q[:, :, :1], k)
