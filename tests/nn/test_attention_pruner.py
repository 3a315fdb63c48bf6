import pytest
import torch
import torch.nn.functional as F

from mmfast import reference
from mmfast.nn import AttentionPruner
from tests.helpers import assert_close, noncontiguous


def _inputs(b=2, n=37, c=12, lq=5, hq=4, hk=2, d=8, dtype=torch.float32):
    torch.manual_seed(0)
    x = torch.randn(b, n, c, dtype=dtype)
    q = torch.randn(b, lq, hq, d, dtype=dtype)
    k = torch.randn(b, n, hk, d, dtype=dtype)
    return x, q, k


def _reference_top(q, k, keep):
    """Sorted indices of the `keep` largest reference key_attention_mass values."""
    mass = reference.key_attention_mass(q.double(), k.double())
    return mass.topk(keep, dim=1).indices.sort(dim=1).values, mass


def test_mass_keeps_reference_top_k():
    x, q, k = _inputs()
    out = AttentionPruner(keep=11)(x, q, k)
    expected_index, mass = _reference_top(q, k, 11)
    assert out.x.shape == (2, 11, 12)
    assert torch.equal(out.index, expected_index)
    assert torch.equal(out.x, x.gather(1, expected_index[..., None].expand(-1, -1, 12)))
    assert_close(out.scores, mass, atol=1e-5, rtol=1e-5, name="scores")
    strided = AttentionPruner(keep=11)(noncontiguous(x), noncontiguous(q), noncontiguous(k))
    assert torch.equal(strided.index, out.index) and torch.equal(strided.x, out.x)


def test_cls_score_keeps_cls_and_top_cls_attention():
    x, q, k = _inputs(n=50)
    out = AttentionPruner(keep=9, score="cls")(x, q, k)
    # VisionZip: CLS attention to the patch tokens (summed over heads), top 8, plus CLS.
    mass = reference.key_attention_mass(q[:, :1].double(), k.double())[:, 1:]
    top = mass.topk(8, dim=1).indices + 1
    expected = torch.cat((torch.zeros(2, 1, dtype=torch.int64), top.sort(dim=1).values), dim=1)
    assert torch.equal(out.index, expected)
    assert out.x.shape == (2, 9, 12)


def _visionzip_contextual(x, metric, kept_index, contextual):
    """The dropped tokens grouped as VisionZip does (uniform centres, argmax cosine assignment),
    each group averaged (centre included), written independently with masks and one-hot bmm."""
    b, n, c = x.shape
    mask = torch.ones(b, n, dtype=torch.bool).scatter_(1, kept_index, False)
    x_drop = x[mask].view(b, -1, c)
    m_drop = F.normalize(metric[mask].view(b, n - kept_index.shape[1], -1), dim=-1)
    nd = x_drop.shape[1]
    targets = torch.arange(0, nd, max(1, nd // contextual))[:contextual]
    others = ~torch.isin(torch.arange(nd), targets)
    sim = torch.bmm(m_drop[:, others], m_drop[:, targets].transpose(1, 2))
    one_hot = torch.zeros(b, int(others.sum()), contextual, dtype=x.dtype)
    one_hot.scatter_(2, sim.argmax(dim=2, keepdim=True), 1)
    sums = torch.bmm(one_hot.transpose(1, 2), x_drop[:, others]) + x_drop[:, targets]
    return sums / (one_hot.sum(dim=1) + 1)[..., None]


@pytest.mark.parametrize("n, keep, contextual", [(37, 11, 4), (65, 20, 10), (23, 3, 20)])
def test_contextual_merge_matches_visionzip_grouping(n, keep, contextual):
    x, q, k = _inputs(n=n)
    x64 = x.double().requires_grad_()
    x_ours = x.clone().requires_grad_()
    metric = torch.randn(2, n, 6)
    out = AttentionPruner(keep=keep, contextual=contextual)(x_ours, q, k, metric=metric)
    assert out.x.shape == (2, keep + contextual, 12)
    expected_index, _ = _reference_top(q, k, keep)
    assert torch.equal(out.index, expected_index)
    ctx = _visionzip_contextual(x64, metric.double(), expected_index, contextual)
    expected = torch.cat((x64.gather(1, expected_index[..., None].expand(-1, -1, 12)), ctx), 1)
    assert_close(out.x, expected, atol=1e-5, rtol=1e-5)
    w = torch.randn(out.x.shape, dtype=torch.float64)
    (out.x * w.float()).sum().backward()
    (expected * w).sum().backward()
    assert_close(x_ours.grad, x64.grad, atol=1e-5, rtol=1e-5, name="x.grad")
    # Every output row is a mean (weights summing to 1), so the total gradient of a sum is
    # the number of output rows.
    ones = torch.ones_like(x).requires_grad_()
    AttentionPruner(keep=keep, contextual=contextual)(ones, q, k, metric=metric).x.sum().backward()
    assert_close(ones.grad.sum(1), torch.full((2, 12), float(keep + contextual)),
                 atol=1e-4, rtol=1e-6, name="total weight")


def test_contextual_default_metric_is_mean_key():
    x, q, k = _inputs(n=30)
    pruner = AttentionPruner(keep=8, contextual=3)
    assert torch.equal(pruner(x, q, k).x, pruner(x, q, k, metric=k.mean(dim=2)).x)


def test_bad_budgets_and_arguments():
    x, q, k = _inputs(n=10)
    with pytest.raises(ValueError, match="keep \\+ contextual"):
        AttentionPruner(keep=8, contextual=3)(x, q, k)
    with pytest.raises(ValueError, match="k must be"):
        AttentionPruner(keep=2)(x, q, k[:, :9])
    with pytest.raises(ValueError, match="score"):
        AttentionPruner(keep=2, score="random")
    with pytest.raises(ValueError, match="keep"):
        AttentionPruner(keep=-1)


def test_bfloat16_smoke():
    x, q, k = _inputs(n=40, dtype=torch.bfloat16)
    x.requires_grad_()
    out = AttentionPruner(keep=10, contextual=4)(x, q, k)
    assert out.x.dtype == torch.bfloat16 and out.x.shape == (2, 14, 12)
    assert torch.isfinite(out.x).all()
    out.x.float().sum().backward()
    assert torch.isfinite(x.grad).all()


def test_torch_compile_fullgraph():
    x, q, k = _inputs(n=41)
    pruner = AttentionPruner(keep=12, contextual=5)
    expected = pruner(x, q, k)
    x_c = x.clone().requires_grad_()
    out = torch.compile(pruner, fullgraph=True)(x_c, q, k)
    assert torch.equal(out.index, expected.index)
    assert_close(out.x, expected.x, atol=1e-6, rtol=1e-6)
    out.x.sum().backward()
    assert torch.isfinite(x_c.grad).all()
