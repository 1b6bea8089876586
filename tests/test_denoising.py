"""Tests of denoising queries: attention mask (every forbidden pair masked), query layout, noise
bounds, assignment, loss keys, and that the mask really isolates matching queries and groups."""
import pytest
import torch
from torchvision.ops import box_convert

from dinodet2.modeling.denoising import DenoisingGenerator, DenoisingQueries, denoising_attention_mask
from dinodet2.modeling.transformer import DetrTransformer, MultiLevelTokens, valid_ratios


def test_attention_mask_masks_every_forbidden_pair():
    groups, size, matching = 3, 4, 5
    mask = denoising_attention_mask(groups, size, matching)
    num_dn = groups * size
    assert mask.shape == (num_dn + matching, num_dn + matching) and mask.dtype == torch.bool
    for i in range(num_dn + matching):
        for j in range(num_dn + matching):
            i_dn, j_dn = i < num_dn, j < num_dn
            if not i_dn:
                forbidden = j_dn  # matching queries never see denoising queries
            elif j_dn:
                forbidden = i // size != j // size  # groups are blind to each other
            else:
                forbidden = False  # denoising queries may see matching queries
            assert bool(mask[i, j]) == forbidden, (i, j)


def _targets():
    return [
        {"labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.3, 0.4, 0.2, 0.2], [0.6, 0.5, 0.3, 0.4]])},
        {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.2]])},
    ]


def test_layout_groups_and_assignment():
    torch.manual_seed(0)
    gen = DenoisingGenerator(num_classes=3, d_model=8, num_queries=12, label_noise_ratio=0.0, box_noise_scale=0.0)
    dn = gen(_targets())
    assert isinstance(dn, DenoisingQueries)
    assert (dn.max_objects, dn.group_size, dn.num_groups) == (2, 4, 3)  # 12 // (2 * 2)
    assert dn.queries.shape == (2, 12, 8) and dn.boxes.shape == (2, 12, 4)
    # Without noise, positives and negatives of every group carry the true label and box.
    for g in range(3):
        base = g * 4
        for part in (0, 2):  # positives, negatives
            assert torch.allclose(dn.queries[0, base + part], gen.label_embed.weight[0])
            assert torch.allclose(dn.queries[0, base + part + 1], gen.label_embed.weight[2])
            assert torch.allclose(dn.boxes[0, base + part], _targets()[0]["boxes"][0])
        # image 1 has one object: its second slot of each part is padding (zero content)
        assert dn.queries[1, base + 1].abs().sum() == 0 and dn.queries[1, base + 3].abs().sum() == 0
    indices = dn.match_indices()
    assert indices[0][0].tolist() == [0, 1, 4, 5, 8, 9] and indices[0][1].tolist() == [0, 1] * 3
    assert indices[1][0].tolist() == [0, 4, 8] and indices[1][1].tolist() == [0, 0, 0]


def test_box_noise_bounds_for_positives_and_negatives():
    torch.manual_seed(0)
    box = torch.tensor([[0.5, 0.5, 0.2, 0.2]])  # far from the border: no clamping
    gen = DenoisingGenerator(num_classes=3, d_model=8, num_queries=2000, box_noise_scale=0.4)
    dn = gen([{"labels": torch.tensor([1]), "boxes": box}])
    shift = (box_convert(dn.boxes[0], "cxcywh", "xyxy") - box_convert(box, "cxcywh", "xyxy")).abs()
    half = 0.1 * 0.4  # half the size x noise scale
    positives, negatives = shift[0::2], shift[1::2]
    assert positives.max() <= half + 1e-6
    assert negatives.min() >= half - 1e-6 and negatives.max() <= 2 * half + 1e-6


def test_label_noise_rate():
    torch.manual_seed(0)
    gen = DenoisingGenerator(num_classes=50, d_model=4, num_queries=4000, label_noise_ratio=0.5, box_noise_scale=0)
    dn = gen([{"labels": torch.tensor([7]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}])
    kept = (dn.queries[0] == gen.label_embed.weight[7]).all(-1).float().mean().item()
    # flipped with probability 0.25, and a random label is 7 again with probability 1/50
    assert kept == pytest.approx(0.75 + 0.25 / 50, abs=0.03)


def test_no_objects_gives_no_queries():
    gen = DenoisingGenerator(num_classes=3, d_model=8)
    assert gen([{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}]) is None


def test_invalid_arguments():
    with pytest.raises(ValueError, match="NUM_QUERIES"):
        DenoisingGenerator(3, 8, num_queries=0)
    with pytest.raises(ValueError, match="LABEL_NOISE_RATIO"):
        DenoisingGenerator(3, 8, label_noise_ratio=1.5)
    with pytest.raises(ValueError, match="BOX_NOISE_SCALE"):
        DenoisingGenerator(3, 8, box_noise_scale=-1)


@pytest.mark.parametrize("deformable", [False, True])
def test_mask_isolates_matching_queries_and_groups_in_the_decoder(deformable):
    """Changing denoising queries must not change the matching queries' outputs, and changing one
    group must not change another group's outputs."""
    from conftest import make_tiny_cfg

    from dinodet2.modeling.classification import build_classification

    torch.manual_seed(0)
    cfg = make_tiny_cfg()
    cfg.merge_from_list(["MODEL.DETR.HIDDEN_DIM", 16, "MODEL.DETR.NHEADS", 2, "MODEL.DETR.DEC_LAYERS", 2,
                         "MODEL.DETR.DIM_FEEDFORWARD", 16, "MODEL.DETR.DROPOUT", 0.0, "MODEL.DETR.NUM_QUERIES", 5,
                         "MODEL.DETR.ANCHOR_QUERIES", True, "MODEL.DETR.DEFORMABLE.DECODER", deformable])
    t = DetrTransformer.from_config(cfg, build_classification("ce", 3), num_levels=1).eval()
    level_masks = [torch.zeros(1, 3, 4, dtype=torch.bool)]
    src, pos = torch.randn(1, 12, 16), torch.randn(1, 12, 16)
    args = (MultiLevelTokens(src, pos, level_masks, None, torch.tensor([[3, 4]]), valid_ratios(level_masks)),)

    def dn_queries(seed):
        g = torch.Generator().manual_seed(seed)
        return DenoisingQueries(queries=torch.randn(1, 6, 16, generator=g), boxes=torch.rand(1, 6, 4, generator=g),
                                num_groups=3, max_objects=1, contrastive=True, num_objects=[1])

    with torch.no_grad():
        plain = t(*args).states
        a = t(*args, denoising=dn_queries(1)).states
        b = t(*args, denoising=dn_queries(2)).states
        changed = dn_queries(1)
        changed.queries[:, 2:4] += 1.0  # group 1 only
        changed.boxes[:, 2:4] = changed.boxes[:, 2:4] * 0.5
        c = t(*args, denoising=changed).states
    assert torch.allclose(a[:, :, 6:], plain, atol=1e-5)
    assert torch.allclose(b[:, :, 6:], plain, atol=1e-5)
    assert torch.allclose(c[:, :, 0:2], a[:, :, 0:2], atol=1e-6)  # group 0 unchanged
    assert torch.allclose(c[:, :, 4:6], a[:, :, 4:6], atol=1e-6)  # group 2 unchanged
    assert not torch.allclose(c[:, :, 2:4], a[:, :, 2:4])
