"""EMA of the weights (dinodet2.engine.ema): the update against a hand computation, the warm-up
ramp, float32 averages of low-precision weights, swapping the averages in and the live weights back
bit for bit, evaluation with the averages, checkpoints that carry them (published as "model" or
not, complete or trainable-only) and resume: an interrupted and resumed run ends with the
uninterrupted run's EMA and weights, bit for bit, single-process and with 2-process DDP."""
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn
from detectron2.engine import SimpleTrainer
from detectron2.engine.hooks import EvalHook, PeriodicCheckpointer

from dinodet2.engine import Dinodet2Checkpointer, EMAHook, ModelEMA, add_model_ema, trainable_state_dict
from dinodet2.engine.ema import check_ema_config
from dinodet2.engine.nonfinite import NonFiniteStepGuard, guarded_trainer_class

from test_exact_resume import _cfg as _resume_cfg, _train

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Tiny(nn.Module):
    """A trainable linear layer, a frozen parameter, a float buffer that changes every forward
    and an integer step counter; the loss is NaN when the batch says so."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 2)
        self.frozen = nn.Parameter(torch.tensor([1.0, 2.0]), requires_grad=False)
        self.register_buffer("running", torch.zeros(2))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    def forward(self, batch):
        x, bad = batch
        with torch.no_grad():
            self.running += x.mean(0)[:2]
            self.count += 1
        loss = (self.linear(x) * self.frozen).pow(2).mean()
        return {"loss": loss * float("nan") if bad else loss}


def _batches(bad_iters=()):
    g = torch.Generator().manual_seed(0)
    it = 0
    while True:
        yield torch.randn(4, 3, generator=g), it in bad_iters
        it += 1


def _average_in_float64(start, values, decays):
    avg = start.double()
    for v, d in zip(values, decays):
        avg = d * avg + (1 - d) * v.double()
    return avg


# ------------------------------------------------------------------------------------------------
# the average
# ------------------------------------------------------------------------------------------------
def test_update_matches_a_hand_computation_and_tracks_what_changes():
    model = _Tiny()
    ema = ModelEMA(model, decay=0.9, tau=0)
    ema.reset()
    assert set(ema.average) == {"linear.weight", "linear.bias", "running", "count"}  # not the frozen one
    start = model.linear.weight.detach().clone()
    values = []
    for step in range(3):
        with torch.no_grad():
            model.linear.weight.add_(torch.full_like(model.linear.weight, 0.5 * (step + 1)))
            model.count += 5
        values.append(model.linear.weight.detach().clone())
        assert ema.update() == 0.9
    expected = _average_in_float64(start, values, [0.9] * 3)
    torch.testing.assert_close(ema.average["linear.weight"].double(), expected, rtol=1e-6, atol=1e-7)
    assert ema.average["count"].dtype == torch.long and int(ema.average["count"]) == 15  # copied, not averaged
    assert ema.num_updates == 3


def test_decay_warm_up_ramp():
    ema = ModelEMA(_Tiny(), decay=0.9997, tau=2000)
    assert ema.decay_at(1) == pytest.approx(0.9997 * (1 - math.exp(-1 / 2000)), rel=1e-12)
    assert ema.decay_at(2000) == pytest.approx(0.9997 * (1 - math.exp(-1)), rel=1e-12)
    assert ema.decay_at(100_000) == pytest.approx(0.9997, rel=1e-12)
    assert [ema.decay_at(k) for k in (1, 10, 100)] == sorted(ema.decay_at(k) for k in (1, 10, 100))
    assert ModelEMA(_Tiny(), decay=0.99, tau=0).decay_at(1) == 0.99
    # the first update with the ramp follows the live weights almost entirely
    model = _Tiny()
    ramped = ModelEMA(model, decay=0.9997, tau=2000)
    ramped.reset()
    with torch.no_grad():
        model.linear.weight.add_(1.0)
    d = ramped.update()
    assert d < 1e-3
    torch.testing.assert_close(ramped.average["linear.weight"], model.linear.weight.detach(), atol=1e-3, rtol=0)


def test_low_precision_weights_are_averaged_in_float32():
    model = _Tiny().to(torch.bfloat16)
    with torch.no_grad():
        model.linear.weight.fill_(1.0)
    ema = ModelEMA(model, decay=0.99, tau=0)
    ema.reset()
    with torch.no_grad():
        model.linear.weight.fill_(1.0078125)  # the next bf16 value after 1
    ema.update()
    avg = ema.average["linear.weight"]
    assert avg.dtype == torch.float32
    # 0.99 * 1 + 0.01 * 1.0078125 = 1.000078125: representable in float32, lost in bfloat16
    torch.testing.assert_close(avg, torch.full_like(avg, 1.000078125), rtol=0, atol=1e-7)
    assert ema.averaged_weights()["linear.weight"].dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swap_in_then_live_weights_back_bit_for_bit(dtype):
    model = _Tiny().to(dtype)
    ema = ModelEMA(model, decay=0.5, tau=0)
    ema.reset()
    with torch.no_grad():
        model.linear.weight.mul_(3.0).add_(0.1)
        model.running.add_(1.0)
    ema.update()
    live = {k: v.clone() for k, v in model.state_dict().items()}
    with ema.swapped_in():
        torch.testing.assert_close(model.linear.weight.detach(), ema.average["linear.weight"].to(dtype), rtol=0, atol=0)
        torch.testing.assert_close(model.running, ema.average["running"].to(dtype), rtol=0, atol=0)
        assert not torch.equal(model.linear.weight, live["linear.weight"])
        with pytest.raises(RuntimeError, match="already swapped"):
            with ema.swapped_in():
                pass
    for name, value in model.state_dict().items():
        assert torch.equal(value, live[name]), name
    with pytest.raises(ZeroDivisionError):  # restored when the block fails too
        with ema.swapped_in():
            1 / 0
    assert all(torch.equal(v, live[k]) for k, v in model.state_dict().items())


def test_wrapped_and_compiled_models_use_the_plain_names():
    model = _Tiny()
    for wrapped in (nn.DataParallel(model), torch.compile(model)):
        ema = ModelEMA(wrapped)
        ema.reset()
        assert set(ema.average) == {"linear.weight", "linear.bias", "running", "count"}
        assert ema.model is model


def test_config_values_are_checked(tiny_cfg):
    for key, value, message in [("DECAY", 1.0, "DECAY must be in"), ("DECAY", 0.0, "DECAY must be in"),
                                ("TAU", -1.0, "TAU must be >= 0"), ("CHECKPOINT_MODEL", "best", "CHECKPOINT_MODEL")]:
        cfg = tiny_cfg.clone()
        cfg.SOLVER.EMA[key] = value
        with pytest.raises(ValueError, match=message):
            check_ema_config(cfg)
    check_ema_config(tiny_cfg)


# ------------------------------------------------------------------------------------------------
# hook, evaluation, checkpoints (Detectron2's SimpleTrainer on the tiny module)
# ------------------------------------------------------------------------------------------------
def _simple_run(tmp_path, *, ema_on=True, bad_iters=(), max_iter=4, checkpoint_model="ema"):
    """Trains _Tiny for ``max_iter`` steps behind the non-finite guard ("skip"), with Detectron2's
    checkpointer / evaluation hooks (period 2); the evaluation records what the model holds."""
    torch.manual_seed(0)
    model = _Tiny()
    optimizer = torch.optim.SGD(model.linear.parameters(), lr=0.1)
    trainer = guarded_trainer_class(SimpleTrainer)(model, _batches(bad_iters), optimizer,
                                                   guard=NonFiniteStepGuard("skip"))
    checkpointer = Dinodet2Checkpointer(model, str(tmp_path), optimizer=optimizer)
    seen = []

    def evaluate():
        seen.append({k: v.clone() for k, v in model.state_dict().items()})
        return {}

    hooks = [PeriodicCheckpointer(checkpointer, 2), EvalHook(2, evaluate)]
    ema = None
    if ema_on:
        ema = ModelEMA(model, decay=0.8, tau=0)
        hooks = add_model_ema(hooks, ema, checkpointer, evaluate=evaluate, eval_period=2,
                              checkpoint_model=checkpoint_model, skipped_steps=lambda: trainer.guard.skipped_steps)
        assert [type(h) for h in hooks] == [EMAHook, PeriodicCheckpointer, EvalHook]
    trainer.register_hooks(hooks)
    trainer.train(0, max_iter)
    return model, ema, seen


def test_evaluation_sees_the_ema_and_training_does_not(tmp_path):
    plain, _, seen_live = _simple_run(tmp_path / "plain", ema_on=False)
    model, ema, seen = _simple_run(tmp_path / "ema")
    assert len(seen) == len(seen_live) == 2  # after iteration 1 and after training
    # the last evaluation saw the final averages, not the live weights ...
    for name in ema.average:
        torch.testing.assert_close(seen[-1][name], ema.average[name].to(seen[-1][name].dtype), rtol=0, atol=0)
    assert not torch.equal(seen[-1]["linear.weight"], model.linear.weight)
    assert not torch.equal(seen[0]["linear.weight"], seen_live[0]["linear.weight"])
    # ... and the training itself is the one without EMA, bit for bit
    for name, value in plain.state_dict().items():
        assert torch.equal(value, model.state_dict()[name]), name
    assert ema.num_updates == 4


def test_skipped_steps_are_not_averaged(tmp_path):
    model, ema, _ = _simple_run(tmp_path, bad_iters=(2,))
    assert ema.num_updates == 3


@pytest.mark.parametrize("checkpoint_model", ["ema", "live"])
def test_checkpoints_carry_the_ema_and_resume_restores_the_training_weights(tmp_path, checkpoint_model):
    model, ema, _ = _simple_run(tmp_path, checkpoint_model=checkpoint_model)
    saved = torch.load(tmp_path / "model_final.pth", weights_only=True)
    assert saved["ema"]["num_updates"] == 4
    for name, avg in ema.average.items():
        assert torch.equal(saved["ema"]["average"][name], avg), name
    live = model.state_dict()
    published = {k: v.to(live[k].dtype) for k, v in ema.average.items()}
    expected_model = {**live, **published} if checkpoint_model == "ema" else live
    for name, value in expected_model.items():
        assert torch.equal(saved["model"][name], value), name
    assert ("training_weights" in saved) == (checkpoint_model == "ema")

    # evaluation / MODEL.WEIGHTS: "model" as written
    fresh = _Tiny()
    Dinodet2Checkpointer(fresh).load(str(tmp_path / "model_final.pth"))
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in expected_model.items())
    fresh = _Tiny()
    Dinodet2Checkpointer(fresh, str(tmp_path), optimizer=torch.optim.SGD(fresh.linear.parameters(), lr=0.1)).resume_or_load(
        str(tmp_path / "model_final.pth"), resume=False)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in expected_model.items())
    # --resume (the training state is restored), even by a run without EMA: the live weights
    fresh = _Tiny()
    Dinodet2Checkpointer(fresh, str(tmp_path), optimizer=torch.optim.SGD(fresh.linear.parameters(), lr=0.1)).resume_or_load(
        "", resume=True)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in live.items())
    # an EMA restored from it continues where it was
    restored = ModelEMA(fresh, decay=0.8, tau=0)
    restored.load_state_dict(saved["ema"])
    assert restored.num_updates == 4 and all(torch.equal(restored.average[k], v) for k, v in ema.average.items())


# ------------------------------------------------------------------------------------------------
# through dinodet2's Trainer
# ------------------------------------------------------------------------------------------------
def _ema_hook(trainer):
    return next(h for h in trainer._hooks if isinstance(h, EMAHook))


def test_trainer_with_ema_trains_evaluates_with_it_and_checkpoints_it(tiny_cfg, tmp_path, monkeypatch):
    from dinodet2.engine import Trainer

    seen = []

    def fake_test(cls, cfg, model):  # what the EvalHook's evaluation sees
        seen.append({k: v.detach().clone() for k, v in model.module.state_dict().items()}
                    if hasattr(model, "module") else {k: v.detach().clone() for k, v in model.state_dict().items()})
        return {}

    monkeypatch.setattr(Trainer, "test", classmethod(fake_test))
    cfg = _resume_cfg(tiny_cfg, tmp_path, "shapes_ema_e2e", tmp_path / "out", SOLVER__MAX_ITER=4,
                      SOLVER__CHECKPOINT_PERIOD=100, TEST__EVAL_PERIOD=2, SOLVER__EMA__ENABLED=True,
                      SOLVER__EMA__DECAY=0.9, SOLVER__EMA__TAU=2.0)
    trainer = _train(cfg, resume=False)
    ema = _ema_hook(trainer).ema
    assert ema.num_updates == 4 and len(seen) == 2
    live = trainer.model.state_dict()
    for name, avg in ema.average.items():
        torch.testing.assert_close(seen[-1][name], avg.to(seen[-1][name].dtype), rtol=0, atol=0, msg=name)
    assert any(not torch.equal(seen[-1][n], live[n]) for n in ema.average if live[n].is_floating_point())
    decays = [v for v, _ in trainer.storage.history("ema/decay").values()]
    assert decays == pytest.approx([0.9 * (1 - math.exp(-k / 2.0)) for k in range(1, 5)])

    saved = torch.load(tmp_path / "out" / "model_final.pth", weights_only=True)
    assert saved["ema"]["num_updates"] == 4
    for name, avg in ema.average.items():
        assert torch.equal(saved["model"][name], avg.to(live[name].dtype)), name
        assert torch.equal(saved["training_weights"][name], live[name]), name


@pytest.mark.parametrize("checkpoint_model", ["ema", "live"])
def test_interrupted_and_resumed_run_has_the_uninterrupted_ema(tiny_cfg, tmp_path, checkpoint_model):
    base = _resume_cfg(tiny_cfg, tmp_path, f"shapes_ema_resume_{checkpoint_model}", tmp_path / "straight",
                       SOLVER__MAX_ITER=6, SOLVER__EMA__ENABLED=True, SOLVER__EMA__DECAY=0.9,
                       SOLVER__EMA__TAU=3.0, SOLVER__EMA__CHECKPOINT_MODEL=checkpoint_model)
    straight = _train(base, resume=False)
    cfg = base.clone()
    cfg.OUTPUT_DIR = str(tmp_path / "interrupted")
    assert _train(cfg, resume=False, interrupt_at=2) is None  # checkpoint after iteration 2 (period 3)
    resumed = _train(cfg, resume=True)
    assert resumed.start_iter == 3

    a, b = _ema_hook(straight).ema, _ema_hook(resumed).ema
    assert a.num_updates == b.num_updates == 6
    assert a.average.keys() == b.average.keys()
    for name in a.average:
        assert torch.equal(a.average[name], b.average[name]), name
    for (name, x), (_, y) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(x, y), name  # the live weights (restored from "training_weights" with "ema")
    final_a = torch.load(tmp_path / "straight" / "model_final.pth", weights_only=True)
    final_b = torch.load(tmp_path / "interrupted" / "model_final.pth", weights_only=True)
    for key in ("model", "training_weights") if checkpoint_model == "ema" else ("model",):
        assert final_a[key].keys() == final_b[key].keys()
        assert all(torch.equal(final_a[key][k], final_b[key][k]) for k in final_a[key]), key


def test_trainable_only_checkpoints_hold_the_ema_of_what_trains(tiny_cfg, tmp_path, saved_dinov2_dir):
    from detectron2.modeling import build_model

    cfg = _resume_cfg(tiny_cfg, tmp_path, "shapes_ema_trainable_only", tmp_path / "straight",
                      SOLVER__MAX_ITER=4, SOLVER__CHECKPOINT_PERIOD=2, SOLVER__CHECKPOINT_TRAINABLE_ONLY=True,
                      SOLVER__EMA__ENABLED=True, SOLVER__EMA__DECAY=0.9, SOLVER__EMA__TAU=0.0,
                      MODEL__DINOV2__NAME=saved_dinov2_dir, MODEL__DINOV2__RANDOM_INIT=False,
                      MODEL__DINOV2__FREEZE=True, MODEL__DINOV2__PRETRAIN_IMAGE_SIZE=56)
    straight = _train(cfg, resume=False)
    ema = _ema_hook(straight).ema
    inner = straight.model.module if hasattr(straight.model, "module") else straight.model
    trainable = trainable_state_dict(inner)
    assert set(ema.average) == set(trainable)
    frozen = [k for k in inner.state_dict() if k not in trainable]
    assert frozen  # the pretrained ViT's weights: neither averaged nor written

    saved = torch.load(tmp_path / "straight" / "model_final.pth", weights_only=True)
    assert saved["dinodet2_format"] == "trainable_only"
    assert set(saved["model"]) == set(saved["training_weights"]) == set(saved["ema"]["average"]) == set(trainable)
    # what evaluation loads: the averages + the pretrained backbone
    torch.manual_seed(123)
    fresh = build_model(cfg)
    pretrained = {k: fresh.state_dict()[k].clone() for k in frozen}
    Dinodet2Checkpointer(fresh).load(str(tmp_path / "straight" / "model_final.pth"))
    state = fresh.state_dict()
    for name, avg in ema.average.items():
        assert torch.equal(state[name], avg.to(state[name].dtype)), name
    assert all(torch.equal(state[k], pretrained[k]) for k in frozen)

    # resumed from the iteration-1 checkpoint: the uninterrupted run's EMA and weights
    resumed_cfg = cfg.clone()
    resumed_cfg.OUTPUT_DIR = str(tmp_path / "interrupted")
    assert _train(resumed_cfg, resume=False, interrupt_at=1) is None
    resumed = _train(resumed_cfg, resume=True)
    assert resumed.start_iter == 2
    b = _ema_hook(resumed).ema
    assert b.num_updates == ema.num_updates == 4
    assert all(torch.equal(ema.average[k], b.average[k]) for k in ema.average)
    assert all(torch.equal(x, y) for x, y in zip(straight.model.state_dict().values(),
                                                 resumed.model.state_dict().values()))


_DDP_WORKER = '''\
"""Two CPU processes (gloo) train the tiny config with EMA; each rank saves its EMA."""
import os
import sys

sys.path.insert(0, {tests_dir!r})
sys.path.insert(0, {repo_root!r})

import conftest  # noqa: E402,F401  (offline Hugging Face)
import torch  # noqa: E402
from detectron2.engine import launch  # noqa: E402
from detectron2.utils import comm  # noqa: E402


def main(out):
    from dinodet2.data import register_shapes_dataset
    from dinodet2.engine import EMAHook, Trainer

    register_shapes_dataset("shapes_ema_ddp", os.path.join(out, "data"), "train", num_images=8, seed=3,
                            min_size=96, max_size=160)
    cfg = conftest.make_tiny_cfg()
    cfg.merge_from_list(["DATASETS.TRAIN", ("shapes_ema_ddp",), "DATASETS.TEST", (), "SOLVER.IMS_PER_BATCH", 2,
                         "SOLVER.MAX_ITER", 3, "SOLVER.CHECKPOINT_PERIOD", 100, "OUTPUT_DIR", out, "SEED", 5,
                         "INPUT.MIN_SIZE_TRAIN", (84,), "INPUT.MAX_SIZE_TRAIN", 128, "DATALOADER.NUM_WORKERS", 0,
                         "SOLVER.EMA.ENABLED", True, "SOLVER.EMA.DECAY", 0.9, "SOLVER.EMA.TAU", 0.0])
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    ema = next(h for h in trainer._hooks if isinstance(h, EMAHook)).ema
    torch.save(ema.state_dict(), os.path.join(out, f"ema_rank{{comm.get_rank()}}.pth"))


if __name__ == "__main__":
    launch(main, 2, dist_url="auto", args=(sys.argv[1],))
'''


def test_ddp_ranks_hold_the_same_ema(tmp_path):
    script = tmp_path / "ddp_ema.py"
    script.write_text(_DDP_WORKER.format(tests_dir=os.path.join(REPO_ROOT, "tests"), repo_root=REPO_ROOT))
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "out")], env=env, capture_output=True,
                          text=True, timeout=400)
    assert proc.returncode == 0, textwrap.shorten(proc.stderr[-3000:], 3000)
    rank0 = torch.load(tmp_path / "out" / "ema_rank0.pth", weights_only=True)
    rank1 = torch.load(tmp_path / "out" / "ema_rank1.pth", weights_only=True)
    assert rank0["num_updates"] == rank1["num_updates"] == 3
    assert rank0["average"].keys() == rank1["average"].keys()
    for name, value in rank0["average"].items():
        assert torch.equal(value, rank1["average"][name]), name
    final = torch.load(tmp_path / "out" / "model_final.pth", weights_only=True)
    assert all(torch.equal(final["ema"]["average"][k], v) for k, v in rank0["average"].items())
