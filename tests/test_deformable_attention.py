"""Tests of the pure-PyTorch multi-scale deformable attention."""
import math

import pytest
import torch

from dinodet2.modeling.transformer.deformable_attention import (
    MultiScaleDeformableAttention,
    ms_deform_attn_sampling,
)

SHAPES = torch.tensor([[3, 5], [2, 2]], dtype=torch.long)  # non-square, different sizes


def _random_inputs(batch=2, queries=3, heads=2, head_dim=3, points=2, dtype=torch.float64, seed=0):
    """Random value / locations (some outside [0, 1]) / softmaxed weights for SHAPES."""
    gen = torch.Generator().manual_seed(seed)
    levels = SHAPES.shape[0]
    tokens = int(SHAPES.prod(1).sum())
    value = torch.randn(batch, tokens, heads, head_dim, generator=gen, dtype=dtype)
    loc = torch.rand(batch, queries, heads, levels, points, 2, generator=gen, dtype=dtype) * 1.4 - 0.2
    loc = loc + 0.013  # keep off exact pixel centres / edges (bilinear kinks)
    logits = torch.randn(batch, queries, heads, levels * points, generator=gen, dtype=dtype)
    weights = logits.softmax(-1).view(batch, queries, heads, levels, points)
    return value, loc, weights


def _naive_sampling(value, spatial_shapes, loc, weights):
    """Reference with explicit loops and hand-written bilinear interpolation (zeros outside)."""
    batch, _, heads, head_dim = value.shape
    _, queries, _, levels, points, _ = loc.shape
    out = torch.zeros(batch, queries, heads * head_dim, dtype=value.dtype)
    starts = [0]
    for h, w in spatial_shapes.tolist():
        starts.append(starts[-1] + h * w)

    def pixel(b, m, lvl, yy, xx):
        h, w = spatial_shapes[lvl].tolist()
        if 0 <= yy < h and 0 <= xx < w:
            return value[b, starts[lvl] + yy * w + xx, m]
        return torch.zeros(head_dim, dtype=value.dtype)

    for b in range(batch):
        for q in range(queries):
            for m in range(heads):
                acc = torch.zeros(head_dim, dtype=value.dtype)
                for lvl in range(levels):
                    h, w = spatial_shapes[lvl].tolist()
                    for p in range(points):
                        x = loc[b, q, m, lvl, p, 0].item() * w - 0.5
                        y = loc[b, q, m, lvl, p, 1].item() * h - 0.5
                        x0, y0 = math.floor(x), math.floor(y)
                        fx, fy = x - x0, y - y0
                        sample = ((1 - fx) * (1 - fy) * pixel(b, m, lvl, y0, x0)
                                  + fx * (1 - fy) * pixel(b, m, lvl, y0, x0 + 1)
                                  + (1 - fx) * fy * pixel(b, m, lvl, y0 + 1, x0)
                                  + fx * fy * pixel(b, m, lvl, y0 + 1, x0 + 1))
                        acc += weights[b, q, m, lvl, p] * sample
                out[b, q, m * head_dim:(m + 1) * head_dim] = acc
    return out


def test_sampling_matches_naive_reference():
    value, loc, weights = _random_inputs()
    assert ((loc < 0) | (loc > 1)).any(), "test case should include points outside the map"
    out = ms_deform_attn_sampling(value, SHAPES, loc, weights)
    ref = _naive_sampling(value, SHAPES, loc, weights)
    assert out.shape == (2, 3, 2 * 3)
    assert out.dtype == torch.float64
    assert (out - ref).abs().max().item() < 1e-5


def test_sampling_gradcheck():
    value, loc, weights = _random_inputs(batch=1, queries=2, heads=2, head_dim=2, points=2, seed=1)
    inputs = tuple(t.clone().requires_grad_(True) for t in (value, loc, weights))
    assert torch.autograd.gradcheck(
        lambda v, s, a: ms_deform_attn_sampling(v, SHAPES, s, a), inputs, eps=1e-6, atol=1e-5)


def test_sampling_half_input_computes_in_float32():
    value, loc, weights = _random_inputs(dtype=torch.float32)
    ref = ms_deform_attn_sampling(value, SHAPES, loc, weights)
    out = ms_deform_attn_sampling(value.half(), SHAPES, loc.half(), weights.half())
    assert out.dtype == torch.float16
    assert torch.allclose(out.float(), ref, atol=2e-2, rtol=2e-2)


def _module_inputs(module, batch=2, queries=5, seed=0, ref_dim=2):
    gen = torch.Generator().manual_seed(seed)
    tokens = int(SHAPES.prod(1).sum())
    query = torch.randn(batch, queries, module.embed_dim, generator=gen)
    value = torch.randn(batch, tokens, module.embed_dim, generator=gen)
    ref = torch.rand(batch, queries, module.num_levels, ref_dim, generator=gen)
    return query, ref, value


def _module(seed=0, **kwargs):
    torch.manual_seed(seed)
    module = MultiScaleDeformableAttention(embed_dim=16, num_heads=4, num_levels=2, num_points=3, **kwargs)
    # Perturb the query-dependent heads so the test exercises non-trivial offsets/weights.
    with torch.no_grad():
        module.sampling_offsets.weight.normal_(0.0, 0.3)
        module.attention_weights.weight.normal_(0.0, 0.3)
    return module.eval()


@pytest.mark.parametrize("ref_dim", [2, 4])
def test_module_output_shape(ref_dim):
    module = _module()
    query, ref, value = _module_inputs(module, ref_dim=ref_dim)
    out = module(query, ref, value, SHAPES)
    assert out.shape == query.shape
    assert torch.isfinite(out).all()


def test_module_rejects_bad_reference_dim():
    module = _module()
    query, ref, value = _module_inputs(module, ref_dim=3)
    with pytest.raises(ValueError):
        module(query, ref, value, SHAPES)


def test_padding_mask_hides_values():
    module = _module()
    query, ref, value = _module_inputs(module)
    mask = torch.zeros(value.shape[:2], dtype=torch.bool)
    mask[0, 2:9] = True  # part of level 0 of image 0
    mask[1, -4:] = True  # all of level 1 of image 1
    out = module(query, ref, value, SHAPES, value_padding_mask=mask)
    changed = value.clone()
    changed[mask] = torch.randn(int(mask.sum()), value.shape[-1]) * 100.0
    out2 = module(query, ref, changed, SHAPES, value_padding_mask=mask)
    assert torch.allclose(out, out2, atol=1e-6)
    assert not torch.allclose(out, module(query, ref, changed, SHAPES), atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_matches_float32(dtype):
    module = _module()
    query, ref, value = _module_inputs(module, ref_dim=4)
    ref32 = module(query, ref, value, SHAPES)
    low = _module().to(dtype)
    out = low(query.to(dtype), ref.to(dtype), value.to(dtype), SHAPES)
    assert out.dtype == dtype
    assert torch.allclose(out.float(), ref32, atol=0.1, rtol=0.05)


def test_invalid_heads_raises():
    with pytest.raises(ValueError, match="divisible"):
        MultiScaleDeformableAttention(embed_dim=30, num_heads=8)


def test_initialisation():
    module = MultiScaleDeformableAttention(embed_dim=32, num_heads=8, num_levels=2, num_points=3)
    assert torch.count_nonzero(module.sampling_offsets.weight) == 0
    assert torch.count_nonzero(module.attention_weights.weight) == 0
    bias = module.sampling_offsets.bias.view(8, 2, 3, 2)
    # head 0 points along +x, head 2 along +y; point p is (p + 1) pixels away; same on every level
    assert torch.allclose(bias[0, 0], torch.tensor([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0]]), atol=1e-6)
    assert torch.allclose(bias[2, 1], torch.tensor([[0.0, 1.0], [0.0, 2.0], [0.0, 3.0]]), atol=1e-6)
    assert torch.allclose(bias.abs().amax(-1)[:, :, 0], torch.ones(8, 2))
    query = torch.randn(2, 4, 32)
    probs = module.attention_probs(query)
    assert torch.allclose(probs, torch.full_like(probs, 1.0 / 6))


def test_sampling_offsets_declare_the_deformable_lr_role():
    module = MultiScaleDeformableAttention(embed_dim=16, num_heads=4, num_levels=2, num_points=2)
    assert module.lr_roles() == {"sampling_offsets.weight": "deformable", "sampling_offsets.bias": "deformable"}
