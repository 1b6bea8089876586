"""Non-finite steps: a diverging run stops before anything non-finite reaches the weights or a
checkpoint; with SOLVER.NONFINITE.POLICY skip, bad steps leave weights and optimizer state alone."""
import os

import pytest
import torch
from detectron2.engine import HookBase

from dinodet2.engine.nonfinite import NonFiniteStepGuard


def _linear_step(guard, loss_value, grad_value=None):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss = model(torch.ones(1, 3)).sum() * loss_value
    loss.backward()
    if grad_value is not None:
        model.bias.grad[0] = grad_value
    admitted = guard.admit(model, {"loss_a": loss.detach(), "loss_b": torch.tensor(1.0)}, iteration=17)
    optimizer.step()
    changed = any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    return admitted, changed, optimizer


def test_finite_steps_pass():
    admitted, changed, _ = _linear_step(NonFiniteStepGuard("stop"), 1.0)
    assert admitted and changed


@pytest.mark.parametrize("loss_value, grad_value, named", [
    (float("nan"), None, "losses loss_a"),
    (1.0, float("inf"), "gradients of 1 parameters (bias)"),
])
def test_stop_policy_raises_before_the_step(loss_value, grad_value, named, tmp_path):
    (tmp_path / "last_checkpoint").write_text("model_0000009.pth")
    guard = NonFiniteStepGuard("stop", output_dir=str(tmp_path))
    with pytest.raises(FloatingPointError) as info:
        _linear_step(guard, loss_value, grad_value)
    message = str(info.value)
    assert "iteration 17" in message and named in message
    assert "model_0000009.pth" in message and "SOLVER.NONFINITE.POLICY" in message and "SOLVER.BASE_LR" in message


def test_skip_policy_leaves_weights_and_optimizer_state_alone_and_stops_after_the_limit():
    guard = NonFiniteStepGuard("skip", max_consecutive_skips=2)
    for _ in range(2):
        admitted, changed, optimizer = _linear_step(guard, 1.0, float("nan"))
        assert not admitted and not changed and not optimizer.state  # AdamW never saw the step
    assert guard.skipped_steps == 2
    with pytest.raises(FloatingPointError, match="MAX_CONSECUTIVE_SKIPS=2"):
        _linear_step(guard, float("inf"))
    guard.consecutive_skips = 1
    assert _linear_step(guard, 1.0)[0] and guard.consecutive_skips == 0  # a good step resets the count


def test_invalid_policy_names_the_key():
    with pytest.raises(ValueError, match="SOLVER.NONFINITE.POLICY"):
        NonFiniteStepGuard("ignore")
    with pytest.raises(ValueError, match="MAX_CONSECUTIVE_SKIPS"):
        NonFiniteStepGuard("skip", max_consecutive_skips=0)


def _cfg(tiny_cfg, tmp_path, name, **extra):
    from dinodet2.data import register_shapes_dataset

    register_shapes_dataset(name, str(tmp_path / "data"), "train", num_images=4, seed=0)
    tiny_cfg.merge_from_list([
        "DATASETS.TRAIN", (name,), "DATASETS.TEST", (), "SOLVER.IMS_PER_BATCH", 2, "SOLVER.MAX_ITER", 30,
        "SOLVER.CHECKPOINT_PERIOD", 1, "OUTPUT_DIR", str(tmp_path / "out"), "SEED", 0,
        "INPUT.MIN_SIZE_TRAIN", (84,), "INPUT.MAX_SIZE_TRAIN", 112, "SOLVER.CLIP_GRADIENTS.ENABLED", False,
    ])
    for key, value in extra.items():
        tiny_cfg.merge_from_list([key.replace("__", "."), value])
    return tiny_cfg


def _all_finite(path):
    state = torch.load(path, map_location="cpu", weights_only=True)
    tensors = list(state["model"].values())
    for group in state["trainer"]["_trainer"]["optimizer"]["state"].values():
        tensors += [v for v in group.values() if torch.is_tensor(v)]
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())


def test_a_diverging_run_leaves_the_last_good_checkpoint_for_resume(tiny_cfg, tmp_path):
    from detectron2.utils.env import seed_all_rng

    from dinodet2.engine import Trainer

    cfg = _cfg(tiny_cfg, tmp_path, "shapes_diverge", SOLVER__BASE_LR=1e3)  # diverges within a few steps
    seed_all_rng(0)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    with pytest.raises(FloatingPointError, match="Non-finite values at iteration"):
        trainer.train()
    out = tmp_path / "out"
    last = (out / "last_checkpoint").read_text()
    written = sorted(f for f in os.listdir(out) if f.startswith("model_"))
    assert written and last == written[-1]
    assert all(_all_finite(out / f) for f in written)

    resumed = Trainer(cfg)
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == int(last[len("model_"):-len(".pth")]) + 1
    assert all(bool(torch.isfinite(p).all()) for p in resumed.model.parameters())


class _PoisonGradients(HookBase):
    def __init__(self, iterations):
        self.iterations = set(iterations)

    def after_backward(self):
        if self.trainer.iter in self.iterations:
            next(p for p in self.trainer.model.parameters() if p.grad is not None).grad.fill_(float("nan"))


class _Snapshots(HookBase):
    def __init__(self):
        self.before = {}

    def before_step(self):
        self.before[self.trainer.iter] = [p.detach().clone() for p in self.trainer.model.parameters()]


def test_skip_policy_in_training_skips_exactly_the_bad_steps(tiny_cfg, tmp_path):
    from dinodet2.engine import Trainer

    cfg = _cfg(tiny_cfg, tmp_path, "shapes_skip", SOLVER__MAX_ITER=6, SOLVER__CHECKPOINT_PERIOD=100,
               SOLVER__NONFINITE__POLICY="skip")
    trainer = Trainer(cfg)
    snapshots = _Snapshots()
    trainer.register_hooks([_PoisonGradients({2, 3}), snapshots])
    trainer.resume_or_load(resume=False)
    trainer.train()
    skipped = [v for v, _ in trainer.storage.history("nonfinite/skipped_steps").values()]
    assert skipped == [1, 2]
    same = [all(torch.equal(a, b) for a, b in zip(snapshots.before[i], snapshots.before[i + 1])) for i in range(5)]
    assert same == [False, False, True, True, False]  # steps 2 and 3 changed nothing
    assert "total_loss" in trainer.storage.histories()
