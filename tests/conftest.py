"""Shared fixtures: a tiny dinodet2 config and a tiny DINOv2 saved to a local directory.

Nothing here (or in the tests) may touch the network: HF_HUB_OFFLINE is set before
``transformers`` / ``huggingface_hub`` are imported.
"""
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import pathlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS_DIR = REPO_ROOT / "configs"
TINY_CONFIG = CONFIGS_DIR / "Demo" / "detr_shapes_tiny.yaml"

# Size of the tiny saved DINOv2 (must agree with `tiny_cfg`'s MODEL.DINOV2 sizes).
TINY_HIDDEN = 32
TINY_LAYERS = 2
TINY_HEADS = 2


def make_tiny_cfg():
    """A fresh, small dinodet2 config (the demo config with shrunken sizes)."""
    from detectron2.config import get_cfg

    import dinodet2  # noqa: F401  (registrations)
    from dinodet2.config import add_dinodet2_config

    cfg = get_cfg()
    add_dinodet2_config(cfg)
    cfg.merge_from_file(str(TINY_CONFIG))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.DINOV2.HIDDEN_SIZE = TINY_HIDDEN
    cfg.MODEL.DINOV2.NUM_LAYERS = TINY_LAYERS
    cfg.MODEL.DINOV2.NUM_HEADS = TINY_HEADS
    # GroupNorm(32, HIDDEN_DIM) in DETR's input projection needs a multiple of 32.
    cfg.MODEL.DETR.HIDDEN_DIM = 32
    cfg.MODEL.DETR.NHEADS = 2
    cfg.MODEL.DETR.DEC_LAYERS = 2
    cfg.MODEL.DETR.DIM_FEEDFORWARD = 64
    cfg.MODEL.DETR.NUM_QUERIES = 10
    # Unit tests default to the seed's head (softmax CE, learned queries); tests of the two-stage
    # decoder the demo uses switch it on explicitly.
    cfg.MODEL.DETR.TWO_STAGE = False
    cfg.MODEL.DETR.CLASS_LOSS = "ce"
    cfg.MODEL.DETR.CLASS_WEIGHT = 1.0
    cfg.MODEL.DETR.COST_CLASS = 1.0
    cfg.MODEL.SFP.OUT_CHANNELS = 32
    return cfg


# The improved demo decoder (configs/Demo/detr_shapes_tiny_improved.yaml) on the tiny sizes, without
# denoising: a 3-level pyramid, a deformable encoder layer, deformable two-stage decoding, varifocal loss.
IMPROVED_TINY = {"MODEL.BACKBONE.NAME": "build_dinov2_sfp_backbone", "MODEL.SFP.SCALE_FACTORS": [2.0, 1.0, 0.5],
                 "MODEL.DETR.ENC_LAYERS": 1, "MODEL.DETR.DEFORMABLE.ENCODER": True,
                 "MODEL.DETR.DEFORMABLE.DECODER": True, "MODEL.DETR.TWO_STAGE": True,
                 "MODEL.DETR.CLASS_LOSS": "varifocal"}


def make_improved_tiny_cfg(opts=None):
    """:func:`make_tiny_cfg` with :data:`IMPROVED_TINY` and then ``opts`` ({key: value}) merged, seeded."""
    torch.manual_seed(0)
    cfg = make_tiny_cfg()
    for key, value in {**IMPROVED_TINY, **(opts or {})}.items():
        cfg.merge_from_list([key, value])
    return cfg


@pytest.fixture
def tiny_cfg():
    """Function-scoped fresh tiny config (safe to mutate)."""
    torch.manual_seed(0)
    return make_tiny_cfg()


@pytest.fixture(scope="session")
def saved_dinov2_dir(tmp_path_factory):
    """Directory holding a tiny random ``Dinov2Model`` written by ``save_pretrained``."""
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(1234)
    config = Dinov2Config(hidden_size=TINY_HIDDEN, num_hidden_layers=TINY_LAYERS,
                          num_attention_heads=TINY_HEADS, image_size=56, patch_size=14)
    model = Dinov2Model(config).eval()
    # Make the position-embedding table and LayerScale non-trivial so that parity tests are
    # sensitive to how positions are interpolated and how blocks are applied.
    with torch.no_grad():
        model.embeddings.cls_token.normal_()
        for layer in model.encoder.layer:
            layer.layer_scale1.lambda1.fill_(0.5)
            layer.layer_scale2.lambda1.fill_(0.5)
    path = tmp_path_factory.mktemp("tiny_dinov2")
    model.save_pretrained(str(path))
    return str(path)


def make_instances(h, w, boxes, classes):
    """Detectron2 ``Instances`` of an ``h x w`` image with XYXY ``boxes`` and ``classes``."""
    from detectron2.structures import Boxes, Instances

    inst = Instances((h, w))
    inst.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
    inst.gt_classes = torch.tensor(classes, dtype=torch.int64)
    return inst


def make_train_batch():
    """Two training inputs of different sizes with 2 and 1 objects (random pixels)."""
    return [
        {"image": torch.rand(3, 70, 98) * 255,
         "instances": make_instances(70, 98, [[5, 5, 40, 50], [50, 10, 90, 60]], [0, 2])},
        {"image": torch.rand(3, 56, 56) * 255, "instances": make_instances(56, 56, [[10, 12, 30, 40]], [1])},
    ]


def write_images(folder, sizes):
    """Random BGR images ``{file name: (height, width)}`` with a white rectangle each, written into
    the new ``folder`` (returned)."""
    import cv2
    import numpy as np

    rng = np.random.default_rng(0)
    folder.mkdir()
    for name, (h, w) in sizes.items():
        image = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        cv2.rectangle(image, (10, 10), (w // 2, h // 2), (255, 255, 255), -1)
        cv2.imwrite(str(folder / name), image)
    return folder


def load_tool(name):
    """The module of ``tools/<name>.py`` (tools are scripts, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "tools" / f"{name}.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool
