"""Cost, fusion and ot_attention on the reference path: hand-worked cases, masks, gradients."""
import math

import pytest
import torch
import torch.nn.functional as F

from pisces_fast import OTAttention, fuse_attention, ot_attention, spatiotemporal_cost, video_token_positions
from pisces_fast.ops import reference


def test_cost_hand_worked_example():
    # one text token, three video tokens in two frames
    q = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    k = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]], dtype=torch.float64)
    attn = torch.tensor([[0.5, 0.5, 0.0]], dtype=torch.float64)
    frame_idx = torch.tensor([0.0, 1.0, 1.0], dtype=torch.float64)
    coords = torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    cost = spatiotemporal_cost(q, k, attn, frame_idx, coords, gamma=0.2, eta=0.2)
    # sem = [0, 1, 2] -> [0, .5, 1]; tau = .5 so tem = [.5, .5, .5] is constant -> 0;
    # pi = (0, .5): spa = [.5, .5, sqrt(1.25)] -> [0, 0, 1]; total [0, .5, 1.2] -> [0, 5/12, 1]
    expected = torch.tensor([[0.0, 0.5 / 1.2, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(cost, expected, rtol=0, atol=1e-15)


def test_cost_temporal_and_spatial_terms_by_hand():
    # two text tokens attending to one frame each; four video tokens (2 frames x 1x2 grid)
    q = torch.ones(2, 3, dtype=torch.float64)
    k = torch.ones(4, 3, dtype=torch.float64)  # semantic term constant -> 0
    frame_idx, coords = video_token_positions(2, 1, 2, dtype=torch.float64)
    attn = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]], dtype=torch.float64)
    cost = spatiotemporal_cost(q, k, attn, frame_idx, coords, gamma=1.0, eta=0.0)
    # tau = [0, 1]; tem = |tau_i - t_j| = [[0,0,1,1],[1,1,0,0]] already in [0, 1]
    torch.testing.assert_close(cost, torch.tensor([[0, 0, 1, 1], [1, 1, 0, 0]], dtype=torch.float64))
    cost = spatiotemporal_cost(q, k, attn, frame_idx, coords, gamma=0.0, eta=1.0)
    # pi = [(0, .5), (0, 1)]; spa = [[.5,.5,.5,.5],[1,0,1,0]] -> range [0,1] already
    torch.testing.assert_close(cost, torch.tensor([[0.5, 0.5, 0.5, 0.5], [1, 0, 1, 0]], dtype=torch.float64))


def test_cost_masks_normalize_over_valid_entries_only():
    q, k = torch.randn(2, 5, 8, dtype=torch.float64), torch.randn(2, 7, 8, dtype=torch.float64)
    scores = torch.randn(2, 5, 7, dtype=torch.float64)
    scores[0, :, 6] = -math.inf  # attention over the real keys only, as ot_attention computes it
    attn = torch.softmax(scores, -1)
    fi, co = video_token_positions(7, 1, 1, dtype=torch.float64)
    row_mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    col_mask = torch.tensor([[1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    cost = spatiotemporal_cost(q, k, attn, fi, co, row_mask=row_mask, col_mask=col_mask)
    alone = spatiotemporal_cost(q[0, :3], k[0, :6], attn[0, :3, :6], fi[:6], co[:6])
    torch.testing.assert_close(cost[0, :3, :6], alone)
    assert torch.all(cost[0, 3:] == 0) and torch.all(cost[0, :, 6] == 0)
    assert cost[0, :3, :6].min() == 0 and cost[0, :3, :6].max() == 1
    assert cost[1].min() == 0 and cost[1].max() == 1


def test_cost_degenerate_components_contribute_zero():
    q = torch.randn(3, 4, dtype=torch.float64)
    k = torch.randn(5, 4, dtype=torch.float64)
    attn = torch.softmax(torch.randn(3, 5, dtype=torch.float64), -1)
    fi, co = video_token_positions(1, 1, 5, dtype=torch.float64)  # one frame: no temporal signal
    with_t = spatiotemporal_cost(q, k, attn, fi, co, gamma=5.0, eta=0.0)
    without_t = spatiotemporal_cost(q, k, attn, fi, co, gamma=0.0, eta=0.0)
    torch.testing.assert_close(with_t, without_t)
    flat = spatiotemporal_cost(torch.ones(3, 4), torch.ones(5, 4), torch.full((3, 5), 0.2), *video_token_positions(1, 1, 5), eta=0.0)
    assert torch.all(flat == 0)


def test_fuse_attention_by_hand():
    attn = torch.tensor([[0.5, 0.5, 0.0]], dtype=torch.float64)
    plan = torch.tensor([[0.3, 0.1, 0.2]], dtype=torch.float64)
    e = 1e-3
    raw = torch.tensor([[(0.5 + e) * (0.3 + e), (0.5 + e) * (0.1 + e), e * (0.2 + e)]], dtype=torch.float64)
    torch.testing.assert_close(fuse_attention(attn, plan, eps=e), raw / raw.sum())
    log_space = torch.softmax(torch.log(attn + e) + torch.log(plan + e), dim=-1)  # Eq. 3 literally
    torch.testing.assert_close(fuse_attention(attn, plan, eps=e), log_space)
    masked = fuse_attention(attn, plan, eps=e, col_mask=torch.tensor([True, True, False]))
    assert masked[0, 2] == 0 and torch.isclose(masked.sum(), torch.tensor(1.0, dtype=torch.float64))


def _inputs(b=2, h=3, n=5, m=9, d=4, dv=3, dtype=torch.float64, requires_grad=True):
    q = torch.randn(b, h, n, d, dtype=dtype, requires_grad=requires_grad)
    k = torch.randn(b, h, m, d, dtype=dtype, requires_grad=requires_grad)
    v = torch.randn(b, h, m, dv, dtype=dtype, requires_grad=requires_grad)
    return q, k, v


def _fixed_plan_attention(q, k, v, plan, key_mask, query_mask, fuse_eps=1e-8):
    """The differentiable part of ot_attention with the plan given: what the gradient must be."""
    scale = 1 / math.sqrt(q.shape[-1])
    attn = reference.attention_probs(q, k, scale, key_mask)
    col_mask = None if key_mask is None else key_mask[:, None, :].expand(*attn.shape[:-2], attn.shape[-1])
    out = reference.fuse_attention(attn, plan, eps=fuse_eps, col_mask=col_mask) @ v
    if query_mask is not None:
        out = out * query_mask[:, None, :, None]
    return out


@pytest.mark.parametrize("masked", [False, True])
def test_ot_attention_gradients_through_attention_only(masked):
    q, k, v = _inputs(h=1, n=4, m=6, d=3, dv=2)
    fi, co = video_token_positions(3, 1, 2, dtype=torch.float64)
    key_mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2], dtype=torch.bool) if masked else None
    query_mask = torch.tensor([[1] * 4, [1] * 3 + [0]], dtype=torch.bool) if masked else None
    out, plan = ot_attention(q, k, v, fi, co, key_padding_mask=key_mask, query_padding_mask=query_mask,
                             return_plan=True, backend="reference")
    assert not plan.requires_grad and plan.grad_fn is None
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    expected_out = _fixed_plan_attention(q, k, v, plan, key_mask, query_mask)
    torch.testing.assert_close(out, expected_out)
    expected = torch.autograd.grad(expected_out.sum(), (q, k, v))
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e)
    # and the fixed-plan function's analytic gradient is right (finite differences)
    assert torch.autograd.gradcheck(lambda a, b_, c: _fixed_plan_attention(a, b_, c, plan, key_mask, query_mask), (q, k, v))
    if masked:
        assert torch.all(out[1, :, 3:] == 0)
        valid = query_mask[:, None, :, None] & key_mask[:, None, None, :]
        assert torch.all(plan.masked_select(~valid.expand_as(plan)) == 0)


def test_ot_attention_masked_equals_unpadded():
    q, k, v = _inputs(b=1, requires_grad=False)
    fi, co = video_token_positions(3, 1, 3, dtype=torch.float64)
    qp = torch.cat([q, torch.randn(1, 3, 2, 4, dtype=torch.float64)], 2)
    kp = torch.cat([k, torch.randn(1, 3, 4, 4, dtype=torch.float64)], 2)
    vp = torch.cat([v, torch.randn(1, 3, 4, 3, dtype=torch.float64)], 2)
    fip = torch.cat([fi, torch.zeros(4, dtype=torch.float64)])
    cop = torch.cat([co, torch.zeros(4, 2, dtype=torch.float64)])
    qm = torch.tensor([[True] * 5 + [False] * 2])
    km = torch.tensor([[True] * 9 + [False] * 4])
    out_p, plan_p = ot_attention(qp, kp, vp, fip, cop, key_padding_mask=km, query_padding_mask=qm, return_plan=True, tol=1e-12, max_iter=500, backend="reference")
    out, plan = ot_attention(q, k, v, fi, co, return_plan=True, tol=1e-12, max_iter=500, backend="reference")
    torch.testing.assert_close(out_p[:, :, :5], out)
    torch.testing.assert_close(plan_p[:, :, :5, :9], plan)


def test_ot_attention_low_precision_inputs():
    q, k, v = _inputs(b=1, n=8, m=32, d=16, dv=16, dtype=torch.float32, requires_grad=False)
    fi, co = video_token_positions(2, 4, 4)
    ref = ot_attention(q.double(), k.double(), v.double(), fi, co, backend="reference")
    for dtype, atol in ((torch.float32, 1e-5), (torch.bfloat16, 3e-2), (torch.float16, 5e-3)):
        out = ot_attention(q.to(dtype), k.to(dtype), v.to(dtype), fi, co, backend="reference")
        assert out.dtype == dtype
        torch.testing.assert_close(out.double(), ref, rtol=0, atol=atol)


def test_module_drop_in_and_ablation_switch():
    q, k, v = _inputs(dtype=torch.float32, requires_grad=False)
    fi, co = video_token_positions(3, 1, 3)
    layer = OTAttention(enabled=False, backend="reference")
    torch.testing.assert_close(layer(q, k, v, fi, co), F.scaled_dot_product_attention(q, k, v))
    layer.enabled = True
    torch.testing.assert_close(layer(q, k, v, fi, co), ot_attention(q, k, v, fi, co, backend="reference"))
    assert "mass=0.9" in repr(layer)


def test_plan_changes_attention_towards_transport():
    """With a strongly peaked plan the fused attention follows it; with a flat plan it equals A."""
    attn = torch.softmax(torch.randn(4, 6, dtype=torch.float64), -1)
    flat = fuse_attention(attn, torch.full_like(attn, 1 / 24))
    torch.testing.assert_close(flat, attn, rtol=1e-5, atol=0)
    peaked = torch.zeros_like(attn)
    peaked[:, 2] = 0.25
    assert torch.all(fuse_attention(attn, peaked).argmax(-1) == 2)


def test_video_token_positions_layout():
    fi, co = video_token_positions(2, 2, 3, prefix_tokens=1)
    assert fi.shape == (13,) and co.shape == (13, 2)
    assert fi[0] == 0.5 and co[0].tolist() == [0.5, 1.0]  # the prefix token sits at the centre
    assert fi[1:].tolist() == [0] * 6 + [1] * 6
    assert co[1:4].tolist() == [[0, 0], [0, 1], [0, 2]] and co[4].tolist() == [1, 0]
    with pytest.raises(ValueError, match="frames"):
        video_token_positions(0, 2, 2)
    with pytest.raises(ValueError, match="prefix_tokens"):
        video_token_positions(1, 2, 2, prefix_tokens=-1)
