import pytest
import torch
from torch import nn

import mmfast
from mmfast.nn import Projector
from tests.ops._projector_common import check_like_torch


def _hf_projector(act: str, bias: bool = True):
    """HF LlavaMultiModalProjector from a small config (no download): vision 40 -> text 56."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    config = transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(hidden_size=40, intermediate_size=64,
                                                    num_hidden_layers=1, num_attention_heads=2),
        text_config=transformers.LlamaConfig(hidden_size=56, intermediate_size=64,
                                             num_hidden_layers=1, num_attention_heads=2,
                                             vocab_size=64),
        projector_hidden_act=act, multimodal_projector_bias=bias)
    return LlavaMultiModalProjector(config)


def _llava_sequential(cin, hidden, depth, approximate="none"):
    """LLaVA's mlp{depth}x_gelu (llava/model/multimodal_projector/builder.py)."""
    layers = [nn.Linear(cin, hidden)]
    for _ in range(depth - 1):
        layers += [nn.GELU(approximate=approximate), nn.Linear(hidden, hidden)]
    return nn.Sequential(*layers)


def _compare_modules(ours, theirs, x):
    """Forward and parameter gradients of two modules with the same weights, against float64."""
    theirs64 = _to64(theirs)
    x64 = x.detach().double()
    out, expected, out64 = ours(x), theirs(x), theirs64(x64)
    check_like_torch(out, expected, out64, x.dtype, "output")
    g = torch.randn_like(out64)
    out.backward(g.to(x.dtype))
    expected.backward(g.to(x.dtype))
    out64.backward(g)
    ours_grads = dict(ours.named_parameters())
    for (name, p), (_, p64) in zip(theirs.named_parameters(), theirs64.named_parameters()):
        mine = ours_grads.get(name)
        assert mine is not None, f"no parameter {name} in {list(ours_grads)}"
        check_like_torch(mine.grad, p.grad, p64.grad, x.dtype, f"grad of {name}")


def _to64(module):
    import copy
    return copy.deepcopy(module).double()


@pytest.mark.parametrize("act,approximate", [("gelu", "none"), ("gelu_pytorch_tanh", "tanh")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_hf_llava_projector(act, approximate, dtype):
    hf = _hf_projector(act).to(dtype)
    ours = Projector.from_module(hf)
    assert ours.approximate == approximate and ours.key_style == "hf"
    assert ours.state_dict().keys() == hf.state_dict().keys()
    _compare_modules(ours, hf, torch.randn(2, 9, 40, dtype=dtype))


def test_hf_checkpoint_loads_unchanged_without_bias():
    hf = _hf_projector("gelu", bias=False)
    ours = Projector(40, 56, 56, bias=False)
    ours.load_state_dict(hf.state_dict())
    _compare_modules(ours, hf, torch.randn(5, 40))


@pytest.mark.parametrize("depth", [2, 3])
def test_matches_llava_sequential(depth):
    seq = _llava_sequential(24, 48, depth)
    ours = Projector.from_module(seq)
    assert ours.key_style == "llava" and ours.depth == depth
    assert ours.state_dict().keys() == seq.state_dict().keys()
    _compare_modules(ours, seq, torch.randn(3, 4, 24))


def test_either_checkpoint_naming_loads():
    """An HF-named module takes a LLaVA checkpoint and vice versa (prefix of a parent module)."""
    seq = _llava_sequential(24, 48, 2)
    hf_named = Projector(24, 48, 48)
    parent = nn.Module()
    parent.mm_projector = hf_named
    parent.load_state_dict({f"mm_projector.{k}": v for k, v in seq.state_dict().items()})
    x = torch.randn(6, 24)
    torch.testing.assert_close(hf_named(x), seq(x))
    llava_named = Projector(24, 48, 48, key_style="llava")
    llava_named.load_state_dict(hf_named.state_dict())
    torch.testing.assert_close(llava_named(x), seq(x))


def test_from_module_rejects_other_activations():
    seq = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16))
    with pytest.raises(ValueError, match="ReLU"):
        Projector.from_module(seq)
    with pytest.raises(ValueError, match="depth"):
        Projector(8, 16, 16, depth=1)


@pytest.mark.skipif(not torch.ops.mmfast._cpu_bf16_tile_gemm(),
                    reason=f"bfloat16 GEMMs here: {mmfast.cpu_bf16_gemm()}")
@pytest.mark.parametrize("depth", [2, 3])
def test_prepack_serves_inference_and_follows_weight_changes(depth):
    """After prepack() the inference forward reads the packed copies: the op's output bit for
    bit; an in-place weight update (as an optimizer step makes) is repacked before use; with
    autograd the unpacked, differentiable op runs, and so does the compiled module; train()
    drops the copies; the state_dict keeps its keys."""
    proj = Projector(40, 72, 64, depth=depth, dtype=torch.bfloat16).eval()
    x = torch.randn(3, 9, 40, dtype=torch.bfloat16)
    keys = set(proj.state_dict())
    with torch.no_grad():
        expected = proj(x)
        assert proj.prepack() is proj and proj._packed is not None
        assert torch.equal(proj(x), expected)
        proj.linear_2.weight.mul_(2)
        packed_before = proj._packed
        updated = proj(x)
    assert proj._packed is not packed_before
    proj2 = Projector(40, 72, 64, depth=depth, dtype=torch.bfloat16).eval()
    proj2.load_state_dict(proj.state_dict())
    with torch.no_grad():
        assert torch.equal(updated, proj2(x))
    out = proj(x)  # autograd on: the differentiable op
    out.float().sum().backward()
    assert proj.linear_1.weight.grad is not None and torch.equal(out.detach(), updated)
    assert set(proj.state_dict()) == keys
    with torch.no_grad():  # compiled, the module runs the op (fullgraph: no data-pointer guard)
        assert torch.equal(torch.compile(proj, fullgraph=True)(x), updated)
    proj.train()
    assert proj._packed is None


def test_prepack_warns_where_nothing_is_packed():
    """float32 weights (and CPUs whose bfloat16 GEMMs run elsewhere) are not packed: a warning
    says so and the forward stays the op's."""
    proj = Projector(40, 72, 64)
    with pytest.warns(UserWarning, match="nothing packed"):
        proj.prepack()
    assert proj._packed is None
    x = torch.randn(5, 40)
    with torch.no_grad():
        assert proj(x).shape == (5, 64)
