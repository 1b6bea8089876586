"""Mixed precision (SOLVER.AMP.PRECISION: fp16 with GradScaler on CUDA, bf16 on CUDA or CPU) and gradient
accumulation (SOLVER.ACCUMULATION_STEPS): one optimizer step over micro-batches equals one step over the
whole batch; the non-finite guard, clipping and metrics act once per optimizer step; iterations,
the LR schedule, checkpoints and --resume count optimizer steps."""
import contextlib
import copy
import os

import pytest
import torch
from detectron2.engine import AMPTrainer, SimpleTrainer
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from conftest import make_instances
from dinodet2.engine import build_optimizer
from dinodet2.engine import train_step
from dinodet2.engine.nonfinite import NonFiniteStepGuard, guarded_trainer_class
from dinodet2.engine.precision import MixedPrecision
from dinodet2.engine.train_step import (AccumulatingTrainer, check_accumulation_steps, split_micro_batches,
                                        step_trainer_class)
from dinodet2.modeling.classification import classification_from_config
from dinodet2.modeling.criterion import SetCriterion

CPU_BF16 = MixedPrecision("cpu", torch.bfloat16)


# ------------------------------------------------------------------------------------------------
# precision: what runs where, and the errors
# ------------------------------------------------------------------------------------------------
def _amp_cfg(tiny_cfg, device="cpu", precision="bfloat16", enabled=True):
    tiny_cfg.MODEL.DEVICE = device
    tiny_cfg.SOLVER.AMP.ENABLED = enabled
    tiny_cfg.SOLVER.AMP.PRECISION = precision
    return tiny_cfg


def test_precision_from_config(tiny_cfg):
    assert tiny_cfg.SOLVER.AMP.PRECISION == "float16" and tiny_cfg.SOLVER.ACCUMULATION_STEPS == 1  # defaults
    assert MixedPrecision.from_config(_amp_cfg(tiny_cfg, enabled=False)) is None
    bf16 = MixedPrecision.from_config(_amp_cfg(tiny_cfg))
    assert bf16 == CPU_BF16 and bf16.name == "bfloat16"
    assert not bf16.needs_grad_scaler and bf16.grad_scaler() is None
    with bf16.autocast():
        assert torch.nn.Linear(4, 4)(torch.ones(2, 4)).dtype == torch.bfloat16
    assert MixedPrecision("cuda", torch.float16).needs_grad_scaler


def test_fp16_on_cpu_says_to_use_bf16_or_cuda(tiny_cfg):
    with pytest.raises(ValueError) as info:
        MixedPrecision.from_config(_amp_cfg(tiny_cfg, precision="float16"))
    message = str(info.value)
    assert all(s in message for s in ("SOLVER.AMP.PRECISION", "bfloat16", "CUDA", "SOLVER.AMP.ENABLED"))
    with pytest.raises(ValueError, match="SOLVER.AMP.PRECISION must be one of"):
        MixedPrecision.from_config(_amp_cfg(tiny_cfg, precision="fp8"))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="torch.cuda.is_available"):
            MixedPrecision.from_config(_amp_cfg(tiny_cfg, device="cuda"))


def test_step_trainer_class_keeps_detectron2_trainers_where_they_do_the_job(monkeypatch):
    assert step_trainer_class(None, 1) == (SimpleTrainer, {})
    assert step_trainer_class(MixedPrecision("cuda", torch.float16), 1) == (AMPTrainer, {})
    cls, kwargs = step_trainer_class(MixedPrecision("cuda", torch.bfloat16), 1)
    assert cls is AMPTrainer and kwargs["precision"] == torch.bfloat16  # the pinned wheel takes `precision`
    assert not kwargs["grad_scaler"].is_enabled()  # bf16: no loss scaling
    for precision, steps in ((CPU_BF16, 1), (None, 2), (MixedPrecision("cuda", torch.float16), 4)):
        cls, kwargs = step_trainer_class(precision, steps)
        assert cls is AccumulatingTrainer and kwargs == {"accumulation_steps": steps, "precision": precision}

    class OldAMPTrainer(AMPTrainer):  # a Detectron2 whose AMPTrainer has no `precision`
        def __init__(self, model, data_loader, optimizer, grad_scaler=None):
            super().__init__(model, data_loader, optimizer, grad_scaler=grad_scaler)

    monkeypatch.setattr(train_step, "AMPTrainer", OldAMPTrainer)
    assert step_trainer_class(MixedPrecision("cuda", torch.bfloat16), 1)[0] is AccumulatingTrainer


def test_guard_checks_gradients_under_a_disabled_grad_scaler():
    # bf16 in AMPTrainer: its GradScaler is disabled, so it would not catch non-finite gradients.
    model = torch.nn.Linear(2, 1)
    model(torch.ones(1, 2)).sum().backward()
    model.bias.grad.fill_(float("nan"))
    cls = guarded_trainer_class(AMPTrainer)
    trainer = cls(model, [], torch.optim.SGD(model.parameters(), lr=0.1),
                  grad_scaler=torch.amp.GradScaler("cuda", enabled=False), guard=NonFiniteStepGuard("stop"))
    trainer.iter = 0
    with EventStorage(0), pytest.raises(FloatingPointError, match="gradients of 1 parameters"):
        trainer._write_metrics({"loss": torch.tensor(1.0)}, 0.0)


def test_accumulation_steps_must_divide_the_batch(tiny_cfg):
    tiny_cfg.SOLVER.IMS_PER_BATCH = 8
    for steps, world_size in ((1, 1), (2, 1), (8, 1), (2, 2), (4, 2)):
        tiny_cfg.SOLVER.ACCUMULATION_STEPS = steps
        assert check_accumulation_steps(tiny_cfg, world_size) == steps
    for steps, world_size in ((3, 1), (4, 4), (0, 1)):
        tiny_cfg.SOLVER.ACCUMULATION_STEPS = steps
        with pytest.raises(ValueError, match="SOLVER.ACCUMULATION_STEPS"):
            check_accumulation_steps(tiny_cfg, world_size)
    assert split_micro_batches(list(range(6)), 3) == [[0, 1], [2, 3], [4, 5]]


@pytest.mark.parametrize("class_loss", ["ce", "focal", "varifocal"])
def test_matching_and_losses_stay_fp32_under_bf16_autocast(tiny_cfg, class_loss):
    tiny_cfg.MODEL.DETR.CLASS_LOSS = class_loss
    criterion = SetCriterion.from_config(tiny_cfg, classification_from_config(tiny_cfg))
    torch.manual_seed(0)
    num_logits = tiny_cfg.MODEL.DETR.NUM_CLASSES + (class_loss == "ce")

    def layer():
        return {"pred_logits": torch.randn(2, 10, num_logits).bfloat16(),
                "pred_boxes": (torch.rand(2, 10, 4) * 0.5 + 0.2).bfloat16()}

    outputs = {**layer(), "aux_outputs": [layer()]}
    targets = [{"labels": torch.tensor([0, 1]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.6, 0.3, 0.2]])},
               {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.5, 0.4, 0.4, 0.3]])}]
    reference = criterion(outputs, targets)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = criterion(outputs, targets)
    assert losses.keys() == reference.keys()
    for name, value in losses.items():
        assert value.dtype == torch.float32 and bool(torch.isfinite(value)), name
        assert torch.equal(value, reference[name]), name


# ------------------------------------------------------------------------------------------------
# accumulation == one big batch
# ------------------------------------------------------------------------------------------------
def _equivalence_cfg(tiny_cfg):
    """Two-stage DETR with sigmoid focal classification (normalised by the box count), deep
    supervision, no dropout / denoising / batch norm; SGD with full-model clipping."""
    tiny_cfg.merge_from_list([
        "MODEL.DETR.TWO_STAGE", True, "MODEL.DETR.CLASS_LOSS", "focal", "MODEL.DETR.DROPOUT", 0.0,
        "MODEL.DETR.DN.ENABLED", False, "SOLVER.OPTIMIZER", "SGD", "SOLVER.BASE_LR", 0.1,
        "SOLVER.CLIP_GRADIENTS.ENABLED", True, "SOLVER.CLIP_GRADIENTS.CLIP_TYPE", "full_model",
        "SOLVER.CLIP_GRADIENTS.CLIP_VALUE", 0.1,
    ])
    return tiny_cfg


def _four_images():
    """Same-size images (equal padding in any batch) with 1, 2, 3 and 1 objects: the two halves
    hold 3 and 4 boxes, so a per-micro-batch box normaliser would differ from the batch's."""
    torch.manual_seed(5)
    boxes = [[[5, 5, 40, 50]], [[10, 12, 30, 40], [40, 8, 66, 30]],
             [[2, 3, 20, 20], [30, 30, 60, 66], [8, 40, 30, 68]], [[20, 20, 50, 60]]]
    return [{"image": torch.rand(3, 70, 70) * 255,
             "instances": make_instances(70, 70, b, [i % 3 for i in range(len(b))])} for b in boxes]


def _one_step(trainer):
    with EventStorage(0) as storage:
        trainer.iter = 0
        trainer.storage = storage
        trainer.run_step()
    return storage


def _step_pair(cfg, accumulating_trainer):
    """(one step over the 4 images as one batch with Detectron2's SimpleTrainer, the same step with
    ``accumulating_trainer(model, loader, optimizer)``) from the same initial weights."""
    torch.manual_seed(0)
    model = build_model(cfg).train()
    twin = copy.deepcopy(model)
    batch = _four_images()
    big = guarded_trainer_class(SimpleTrainer)(model, [batch], build_optimizer(cfg, model))
    small = accumulating_trainer(twin, [batch], build_optimizer(cfg, twin))
    return (big, _one_step(big)), (small, _one_step(small))


def _assert_same_step(big, small, big_storage, small_storage):
    for (name, p), q in zip(big.model.named_parameters(), small.model.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-7, msg=name)
        torch.testing.assert_close(q, p, rtol=0, atol=1e-6, msg=name)
    for scalar in ("total_loss", "class_error"):  # logged once per optimizer step, over the whole batch
        a, b = big_storage.history(scalar).values(), small_storage.history(scalar).values()
        assert len(a) == len(b) == 1 and b[0][0] == pytest.approx(a[0][0], rel=1e-5), scalar


def _accumulating(**kwargs):
    return lambda model, loader, optimizer: guarded_trainer_class(AccumulatingTrainer)(
        model, loader, optimizer, accumulation_steps=2, **kwargs)


@pytest.mark.parametrize("scaled", [False, True], ids=["fp32", "grad_scaler"])
def test_two_micro_batches_of_two_equal_one_batch_of_four(tiny_cfg, scaled):
    cfg = _equivalence_cfg(tiny_cfg)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10) if scaled else None
    (big, big_storage), (small, small_storage) = _step_pair(cfg, _accumulating(grad_scaler=scaler))
    grads = [p.grad for p in small.model.parameters() if p.grad is not None]
    assert grads and all(bool(torch.isfinite(g).all()) for g in grads)
    _assert_same_step(big, small, big_storage, small_storage)
    if scaled:
        assert small.grad_scaler.get_scale() == 2.0 ** 10  # finite gradients: the step was taken


def test_clipping_acts_on_the_accumulated_gradient(tiny_cfg, monkeypatch):
    cfg = _equivalence_cfg(tiny_cfg)
    norms = []
    clip = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_",
                        lambda params, *a, **k: norms.append(float(clip(params, *a, **k))) or norms[-1])
    (big, big_storage), (small, small_storage) = _step_pair(cfg, _accumulating())
    assert len(norms) == 2 and norms[1] == pytest.approx(norms[0], rel=1e-5)  # one clip per step, same norm
    assert norms[0] > cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE  # the clip was active in the equivalence test


def test_the_batch_box_count_is_what_makes_it_exact(tiny_cfg, monkeypatch):
    # Normalising each micro-batch by its own box count (3 and 4 boxes, not 3.5 each) changes the step.
    monkeypatch.setattr(AccumulatingTrainer, "_effective_batch", lambda self, batch: contextlib.nullcontext())
    (big, _), (small, _) = _step_pair(_equivalence_cfg(tiny_cfg), _accumulating())
    assert not all(torch.allclose(p, q, rtol=0, atol=1e-6)
                   for p, q in zip(big.model.parameters(), small.model.parameters()))


class _RecordingGuard(NonFiniteStepGuard):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen = []

    def admit(self, model, loss_dict, iteration, check_gradients=True):
        self.seen.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
        return super().admit(model, loss_dict, iteration, check_gradients)


def test_the_guard_sees_the_accumulated_gradients_once(tiny_cfg):
    guards = []

    def guarded(cls, **kwargs):
        def make(model, loader, optimizer):
            guards.append(_RecordingGuard())
            return guarded_trainer_class(cls)(model, loader, optimizer, guard=guards[-1], **kwargs)
        return make

    cfg = _equivalence_cfg(tiny_cfg)
    cfg.SOLVER.CLIP_GRADIENTS.ENABLED = False
    torch.manual_seed(0)
    model = build_model(cfg).train()
    batch = _four_images()
    for make in (guarded(SimpleTrainer), guarded(AccumulatingTrainer, accumulation_steps=2)):
        net = copy.deepcopy(model)
        _one_step(make(net, [batch], build_optimizer(cfg, net)))
    big, small = guards
    assert len(big.seen) == len(small.seen) == 1
    for a, b in zip(big.seen[0], small.seen[0]):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-7)


def test_a_non_finite_micro_batch_skips_the_whole_step(tiny_cfg):
    cfg = _equivalence_cfg(tiny_cfg)
    torch.manual_seed(0)
    model = build_model(cfg).train()
    before = copy.deepcopy(model.state_dict())
    batch = _four_images()
    batch[3]["image"][0, 0, 0] = float("nan")  # the second micro-batch only
    guard = NonFiniteStepGuard("skip")
    trainer = guarded_trainer_class(AccumulatingTrainer)(model, [batch], build_optimizer(cfg, model),
                                                         accumulation_steps=2, guard=guard)
    storage = _one_step(trainer)
    assert guard.skipped_steps == 1 and "total_loss" not in storage.histories()
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


class _FakeDDP(torch.nn.Module):
    """Records, per forward, whether it ran inside ``no_sync`` (as DDP skips the all-reduce there)."""

    def __init__(self, module):
        super().__init__()
        self.module = module
        self.synced = []
        self._no_sync = False

    @contextlib.contextmanager
    def no_sync(self):
        self._no_sync = True
        try:
            yield
        finally:
            self._no_sync = False

    def forward(self, batch):
        self.synced.append(not self._no_sync)
        return self.module(batch)


def test_ddp_all_reduces_only_the_last_micro_batch():
    module = torch.nn.Linear(2, 1)
    model = _FakeDDP(lambda batch: {"loss": module(torch.tensor(batch, dtype=torch.float32)).sum()})
    model.add_module("linear", module)
    trainer = AccumulatingTrainer(model, [[[1.0, 2.0]] * 6], torch.optim.SGD(module.parameters(), lr=0.1),
                                  accumulation_steps=3)
    _one_step(trainer)
    assert model.synced == [False, False, True]


def test_effective_batch_normalises_by_the_batch_box_count(tiny_cfg):
    criterion = SetCriterion.from_config(tiny_cfg, classification_from_config(tiny_cfg))
    targets = [{"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}]
    assert criterion._box_normaliser(targets, torch.device("cpu")) == 1.0
    with criterion.effective_batch(num_boxes=7, num_micro_batches=2):
        assert criterion._box_normaliser(targets, torch.device("cpu")) == 3.5
        with pytest.raises(RuntimeError, match="nested"):
            with criterion.effective_batch(1, 1):
                pass
    with criterion.effective_batch(num_boxes=0, num_micro_batches=4):  # at least 1 box over the batch
        assert criterion._box_normaliser(targets, torch.device("cpu")) == 0.25


# ------------------------------------------------------------------------------------------------
# through Trainer
# ------------------------------------------------------------------------------------------------
def _trainer_cfg(tiny_cfg, tmp_path, name, **extra):
    from dinodet2.data import register_shapes_dataset

    register_shapes_dataset(name, str(tmp_path / "data"), "train", num_images=8, seed=0)
    tiny_cfg.merge_from_list([
        "DATASETS.TRAIN", (name,), "DATASETS.TEST", (), "SOLVER.IMS_PER_BATCH", 4, "SOLVER.MAX_ITER", 3,
        "SOLVER.CHECKPOINT_PERIOD", 2, "OUTPUT_DIR", str(tmp_path / "out"), "SEED", 0,
        "INPUT.MIN_SIZE_TRAIN", (84,), "INPUT.MAX_SIZE_TRAIN", 112, "DATALOADER.NUM_WORKERS", 0,
        "SOLVER.WARMUP_ITERS", 2, "SOLVER.STEPS", (2,),
    ])
    for key, value in extra.items():
        tiny_cfg.merge_from_list([key.replace("__", "."), value])
    return tiny_cfg


def _trainer(cfg):
    from detectron2.utils.env import seed_all_rng

    from dinodet2.engine import Trainer

    seed_all_rng(cfg.SEED)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    return trainer


def test_bf16_trains_on_cpu_through_the_trainer(tiny_cfg, tmp_path):
    cfg = _trainer_cfg(tiny_cfg, tmp_path, "shapes_bf16", SOLVER__AMP__ENABLED=True,
                       SOLVER__AMP__PRECISION="bfloat16", SOLVER__MAX_ITER=2, SOLVER__STEPS=(1,),
                       SOLVER__IMS_PER_BATCH=2)
    trainer = _trainer(cfg)
    assert isinstance(trainer._trainer, AccumulatingTrainer) and trainer._trainer.grad_scaler is None
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    dtypes = set()
    trainer.model.class_embed.register_forward_hook(lambda m, args, out: dtypes.add(out.dtype))
    trainer.train()
    assert dtypes == {torch.bfloat16}  # the forward ran under bf16 autocast
    losses = [v for v, _ in trainer.storage.history("total_loss").values()]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    changed = [n for n, p in trainer.model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert len(changed) > len(before) // 2
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())  # fp32 master weights


def test_iterations_schedule_and_checkpoints_count_optimizer_steps(tiny_cfg, tmp_path):
    cfg = _trainer_cfg(tiny_cfg, tmp_path, "shapes_accumulate", SOLVER__ACCUMULATION_STEPS=2)
    trainer = _trainer(cfg)
    assert isinstance(trainer._trainer, AccumulatingTrainer)
    forwards = []
    trainer.model.register_forward_pre_hook(lambda m, args: forwards.append(len(args[0])))
    trainer.train()
    assert forwards == [2] * 6  # 3 optimizer steps x 2 micro-batches of IMS_PER_BATCH / 2
    assert trainer.iter == 3 and trainer.scheduler.last_epoch == 3
    assert all(s["step"] == 3 for s in trainer.optimizer.state.values())
    for scalar in ("total_loss", "lr", "class_error"):
        assert [int(i) for _, i in trainer.storage.history(scalar).values()] == [0, 1, 2], scalar
    lrs = [v for v, _ in trainer.storage.history("lr").values()]
    assert lrs[0] < lrs[1] and lrs[2] == pytest.approx(cfg.SOLVER.BASE_LR * cfg.SOLVER.GAMMA)  # warmup 2, step at 2
    assert sorted(f for f in os.listdir(cfg.OUTPUT_DIR) if f.endswith(".pth")) == ["model_0000001.pth",
                                                                                   "model_final.pth"]


def test_a_batch_not_divisible_into_micro_batches_is_refused(tiny_cfg, tmp_path):
    from dinodet2.engine import Trainer

    cfg = _trainer_cfg(tiny_cfg, tmp_path, "shapes_indivisible", SOLVER__ACCUMULATION_STEPS=3)
    with pytest.raises(ValueError, match="SOLVER.IMS_PER_BATCH=4 .* multiple of 3"):
        Trainer(cfg)


def test_resume_with_accumulation_is_exact(tiny_cfg, tmp_path):
    from test_exact_resume import _losses, _train

    # randomness in the data (photometric) and in the model (denoising noise, dropout) of every micro-batch
    cfg = _trainer_cfg(tiny_cfg, tmp_path, "shapes_accumulate_resume", SOLVER__ACCUMULATION_STEPS=2,
                       MODEL__DETR__TWO_STAGE=True, MODEL__DETR__CLASS_LOSS="focal",
                       MODEL__DETR__DN__ENABLED=True, MODEL__DETR__DN__NUM_QUERIES=6, MODEL__DETR__DROPOUT=0.1,
                       )
    straight = _train(cfg, resume=False)
    interrupted = cfg.clone()
    interrupted.OUTPUT_DIR = str(tmp_path / "interrupted")
    assert _train(interrupted, resume=False, interrupt_at=1) is None  # right after the checkpoint of iteration 1
    resumed = _train(interrupted, resume=True)
    assert resumed.start_iter == 2
    expected, got = _losses(straight), _losses(resumed)
    assert sorted(got) == [0, 1, 2]
    for it in got:
        assert got[it] == pytest.approx(expected[it], rel=1e-6, abs=1e-7), it
    for (name, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)
