"""Fine-tuning across class counts: a checkpoint trained with 3 classes loads into a 5-class model
(every other weight loaded, the class-dependent ones freshly initialised, one warning naming them)
and trains; a checkpoint of another backbone, or a --resume with another class count, is refused.
Also: a short Trainer run writes the logs a user looks at (TensorBoard events, metrics.json)."""
import contextlib
import glob
import json
import logging
import os

import pytest
import torch
from detectron2.modeling import build_model

from conftest import make_improved_tiny_cfg

from dinodet2.engine.checkpoint import Dinodet2Checkpointer

# Two-stage with per-level proposal heads, denoising and rescoring cascade refinement: every kind of
# class-dependent weight the detector has.
ALL_CLASS_HEADS = {"MODEL.DETR.DN.ENABLED": True, "MODEL.DETR.SCALE_AWARE.PROPOSAL_HEADS": "per_level",
                   "MODEL.DETR.REFINEMENT.ENABLED": True, "MODEL.DETR.REFINEMENT.NUM_STAGES": 1,
                   "MODEL.DETR.REFINEMENT.IOU_THRESHOLDS": (0.5,), "MODEL.DETR.REFINEMENT.POOL_SIZE": 2,
                   "MODEL.DETR.REFINEMENT.RESCORE": True}


def _cfg(num_classes, **opts):
    return make_improved_tiny_cfg({"MODEL.DETR.DN.ENABLED": True, "MODEL.DETR.NUM_CLASSES": num_classes,
                                   **{k.replace("__", "."): v for k, v in opts.items()}})


def _model(cfg, seed):
    torch.manual_seed(seed)
    return build_model(cfg)


def _save(model, directory, name="source"):
    Dinodet2Checkpointer(model, str(directory)).save(name)
    return os.path.join(str(directory), f"{name}.pth")


@contextlib.contextmanager
def _warnings():
    """WARNING records of the loggers a checkpoint load writes to (dinodet2's, fvcore's and
    Detectron2's, whatever their propagation was set to)."""
    records = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append(record)

    handler = Collect(logging.WARNING)
    loggers = [logging.getLogger(name) for name in ("dinodet2", "fvcore", "detectron2")]
    for lg in loggers:
        lg.addHandler(handler)
    try:
        yield records
    finally:
        for lg in loggers:
            lg.removeHandler(handler)


def test_class_dependent_names_are_exactly_the_weights_whose_shape_follows_the_class_count():
    model = _model(_cfg(5, **ALL_CLASS_HEADS), 0)
    three, five = _model(_cfg(3, **ALL_CLASS_HEADS), 0).state_dict(), model.state_dict()
    assert three.keys() == five.keys()
    differing = {k for k in three if three[k].shape != five[k].shape}
    names = set(model.class_dependent_parameter_names())
    assert names == differing
    # every kind is there: decoder class head, per-level proposal heads, DN label embedding, rescoring
    assert {"class_embed.weight", "denoising.label_embed.weight", "transformer.queries.class_head.heads.0.weight",
            "transformer.queries.class_head.heads.2.bias"} <= names
    assert any(k.startswith("refinement.") for k in names)


def test_three_class_checkpoint_loads_into_a_five_class_model(tmp_path):
    source = _model(_cfg(3), 1)
    path = _save(source, tmp_path)
    target = _model(_cfg(5), 2)
    fresh = {k: v.clone() for k, v in target.state_dict().items()}
    class_keys = set(target.class_dependent_parameter_names())
    assert {"class_embed.weight", "class_embed.bias", "denoising.label_embed.weight",
            "transformer.queries.class_head.weight"} <= class_keys

    with _warnings() as records:
        Dinodet2Checkpointer(target).load(path)

    loaded, trained = target.state_dict(), source.state_dict()
    for key, value in loaded.items():
        expected = fresh[key] if key in class_keys else trained[key]
        assert torch.equal(value, expected), key
    # the class heads really differ from the source's (another shape) and the rest really was loaded
    assert not torch.equal(fresh["transformer.decoder.layers.0.ffn.linear1.weight"],
                           loaded["transformer.decoder.layers.0.ffn.linear1.weight"])
    messages = [r.getMessage() for r in records]
    assert len(messages) == 1, messages
    assert "MODEL.DETR.NUM_CLASSES=5" in messages[0]
    for key in class_keys:
        assert key in messages[0]


def test_matching_checkpoint_loads_without_warnings(tmp_path):
    path = _save(_model(_cfg(3), 1), tmp_path)
    target = _model(_cfg(3), 2)
    with _warnings() as records:
        Dinodet2Checkpointer(target).load(path)
    assert [r.getMessage() for r in records] == []


def test_other_decoder_size_mismatch_is_reinitialised_with_one_warning(tmp_path):
    path = _save(_model(_cfg(3), 1), tmp_path)
    target = _model(_cfg(3, MODEL__DETR__NUM_QUERIES=12), 2)
    fresh = target.state_dict()["transformer.queries.content"].clone()
    with _warnings() as records:
        Dinodet2Checkpointer(target).load(path)
    assert torch.equal(target.state_dict()["transformer.queries.content"], fresh)
    messages = [r.getMessage() for r in records]
    assert len(messages) == 1 and "transformer.queries.content (10x32 -> 12x32)" in messages[0], messages


def test_checkpoint_of_another_backbone_is_refused_with_its_keys_named(tmp_path):
    path = _save(_model(_cfg(3), 1), tmp_path)
    wider = _model(_cfg(5, MODEL__DINOV2__HIDDEN_SIZE=64), 2)
    with pytest.raises(ValueError) as info:
        Dinodet2Checkpointer(wider).load(path)
    message = str(info.value)
    assert "backbone.net.vit.embeddings.cls_token (1x1x32 in the checkpoint, 1x1x64 in the model)" in message
    assert "MODEL.DINOV2" in message and "in all)" in message

    deeper = _model(_cfg(3, MODEL__DINOV2__NUM_LAYERS=3), 2)
    with pytest.raises(ValueError, match=r"backbone\.net\.vit\.encoder\.layer\.2\.norm1\.weight \(missing"):
        Dinodet2Checkpointer(deeper).load(path)


def test_trainable_only_checkpoint_with_another_class_count_loads(tmp_path, saved_dinov2_dir):
    pretrained = dict(MODEL__DINOV2__NAME=saved_dinov2_dir, MODEL__DINOV2__RANDOM_INIT=False,
                      MODEL__DINOV2__FREEZE=True, MODEL__DINOV2__PRETRAIN_IMAGE_SIZE=56)
    source_cfg = _cfg(3, **pretrained)
    source = _model(source_cfg, 1)
    Dinodet2Checkpointer(source, str(tmp_path), trainable_only=True, cfg=source_cfg).save("source")
    assert torch.load(tmp_path / "source.pth", weights_only=True)["dinodet2_format"] == "trainable_only"
    target = _model(_cfg(5, **pretrained), 2)
    fresh = {k: v.clone() for k, v in target.state_dict().items()}
    class_keys = set(target.class_dependent_parameter_names())
    with _warnings() as records:
        Dinodet2Checkpointer(target).load(str(tmp_path / "source.pth"))
    trained = source.state_dict()
    for key, value in target.state_dict().items():  # frozen ViT weights: the same pretrained ones
        assert torch.equal(value, fresh[key] if key in class_keys else trained[key]), key
    assert len([r for r in records if "MODEL.DETR.NUM_CLASSES=5" in r.getMessage()]) == 1


def test_resume_with_another_class_count_is_refused(tmp_path):
    path = _save(_model(_cfg(3), 1), tmp_path)
    target = _model(_cfg(5), 2)
    optimizer = torch.optim.SGD(target.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"Cannot resume.*class_embed\.weight \(3x32 -> 5x32\)"):
        Dinodet2Checkpointer(target, optimizer=optimizer).load(path)


@pytest.fixture(scope="module")
def finetuned_run(tmp_path_factory):
    """One Trainer iteration of a 5-class model from a 3-class checkpoint on a tiny shapes dataset."""
    from detectron2.utils.env import seed_all_rng

    from dinodet2.data import register_shapes_dataset
    from dinodet2.engine import Trainer

    root = tmp_path_factory.mktemp("class_count_run")
    path = _save(_model(_cfg(3), 1), root)
    register_shapes_dataset("shapes_class_count_ft", str(root / "data"), "train", num_images=4, seed=3,
                            min_size=80, max_size=112)
    cfg = _cfg(5)
    cfg.merge_from_list(["DATASETS.TRAIN", ("shapes_class_count_ft",), "DATASETS.TEST", (),
                         "SOLVER.IMS_PER_BATCH", 2, "SOLVER.MAX_ITER", 1, "SOLVER.CHECKPOINT_PERIOD", 100,
                         "INPUT.MIN_SIZE_TRAIN", (84,), "INPUT.MAX_SIZE_TRAIN", 112, "MODEL.WEIGHTS", path,
                         "OUTPUT_DIR", str(root / "out"), "SEED", 7, "DATALOADER.NUM_WORKERS", 0])
    seed_all_rng(cfg.SEED)
    trainer = Trainer(cfg)
    before = trainer.model.class_embed.weight.detach().clone()
    trainer.resume_or_load(resume=False)
    trainer.train()
    return trainer, before, cfg.OUTPUT_DIR


def test_five_class_model_from_three_class_checkpoint_trains_one_iteration(finetuned_run):
    trainer, before, _ = finetuned_run
    assert trainer.iter == 1  # Detectron2 leaves iter at MAX_ITER after the last step
    assert torch.isfinite(torch.tensor(trainer.storage.history("total_loss").latest()))
    after = trainer.model.class_embed.weight.detach()
    assert after.shape == (5, 32) and not torch.equal(after, before)  # the fresh head was trained


def test_training_writes_tensorboard_events_and_metrics_json(finetuned_run):
    pytest.importorskip("torch.utils.tensorboard", reason="tensorboard is not installed")
    _, _, output_dir = finetuned_run
    events = glob.glob(os.path.join(output_dir, "events.out.tfevents.*"))
    assert events and all(os.path.getsize(e) > 0 for e in events)
    with open(os.path.join(output_dir, "metrics.json")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    assert records and records[-1]["iteration"] == 0 and "total_loss" in records[-1]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(os.path.dirname(events[0]))
    accumulator.Reload()
    assert "total_loss" in accumulator.Tags()["scalars"]
