"""Tests of ``MODEL.COMPILE`` (dinodet2.engine.compilation): config checks, unchanged parameter names,
compiled = eager results, graph-break counting and metrics, and the eager fallback.

Inductor needs minutes to compile even the tiny model on 2 busy cores (measured: 115 s for one
inference call, 25 s for a 2-layer MLP with a cold cache), so the model checks use the ``aot_eager``
backend (dynamo + AOTAutograd, the same graphs inductor would get, run by eager kernels) and the
plumbing checks the ``eager`` backend (dynamo only).
"""
import logging
import types

import pytest
import torch
import torch.nn as nn
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from conftest import make_train_batch

from dinodet2.engine import Dinodet2Checkpointer, Trainer
from dinodet2.engine.compilation import (CompileMetricsHook, check_compile_config, compile_model, compile_modes,
                                         compile_report)

# The model checks' backend: what inductor is given (AOTAutograd graphs, forward and backward), run by
# eager kernels. The model test takes 20-40 s on 2 busy cores (the "eager" backend: 8-17 s) with static
# shapes (DYNAMIC None; its batches keep their sizes), 60 s with DYNAMIC True; symbolic sizes are
# exercised by test_train_net's compiled run on the real data loader.
MODEL_BACKEND = "aot_eager"
IMPROVED = ["MODEL.BACKBONE.NAME", "build_dinov2_sfp_backbone", "MODEL.DETR.ENC_LAYERS", 1,
            "MODEL.DETR.DEFORMABLE.ENCODER", True, "MODEL.DETR.DEFORMABLE.DECODER", True,
            "MODEL.DETR.TWO_STAGE", True, "MODEL.DETR.CLASS_LOSS", "varifocal",
            "MODEL.DETR.LOOK_FORWARD_TWICE", True, "MODEL.DETR.DN.ENABLED", True]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Dynamo's caches and counters are process-wide: every test starts from empty ones."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _compile_cfg(cfg, backend="eager", **keys):
    cfg.MODEL.COMPILE.ENABLED = True
    cfg.MODEL.COMPILE.BACKEND = backend
    for key, value in keys.items():
        setattr(cfg.MODEL.COMPILE, key, value)
    return cfg


def _inference_batch():
    return [{k: v for k, v in x.items() if k != "instances"} for x in make_train_batch()]


class _ToyBackbone(nn.Module):
    def __init__(self, graph_break=False):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))
        self.graph_break = graph_break

    def forward(self, x):
        x = self.layers(x)
        if self.graph_break and x.sum().item() > -1e9:  # .item(): a data-dependent graph break
            x = x + 1
        return x


class _Toy(nn.Module):
    """A meta-architecture stand-in: ``backbone`` (optionally with a graph break) and ``head``."""

    def __init__(self, graph_break=False):
        super().__init__()
        self.backbone = _ToyBackbone(graph_break)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.backbone(x))


def _toy_cfg(tiny_cfg, backend="eager"):
    return _compile_cfg(tiny_cfg, backend, MODULES=["backbone"])


# ------------------------------------------------------------------------------------------------
# config
# ------------------------------------------------------------------------------------------------
def test_defaults_and_config_checks(tiny_cfg):
    c = tiny_cfg.MODEL.COMPILE
    assert (c.ENABLED, c.MODE, c.BACKEND, c.DYNAMIC, list(c.MODULES)) == (
        False, "default", "inductor", True, ["backbone"])
    assert {"default", "reduce-overhead", "max-autotune"} <= set(compile_modes())
    model = build_model(tiny_cfg)
    assert compile_model(tiny_cfg, model) is model and compile_report(model) is None  # off: untouched
    assert model.backbone._compiled_call_impl is None

    check_compile_config(tiny_cfg)
    for key, value, message in [("MODE", "fastest", "not a torch.compile mode"),
                                ("BACKEND", "no_such_backend", "not a registered"),
                                ("DYNAMIC", "yes", "None, True or False"),
                                ("MODULES", [], "is empty"),
                                ("MODULES", ["backbone", "backbone.net"], "inside another")]:
        cfg = _compile_cfg(tiny_cfg.clone(), "inductor", **{key: value})
        with pytest.raises(ValueError, match=message):
            check_compile_config(cfg)
    cfg = _compile_cfg(tiny_cfg.clone(), "eager", MODE="max-autotune")
    with pytest.raises(ValueError, match="inductor mode"):
        check_compile_config(cfg)
    cfg = _compile_cfg(tiny_cfg.clone(), "eager", MODULES=["backbone", "decoder"])
    with pytest.raises(ValueError, match="'decoder'.*its submodules"):
        compile_model(cfg, model)


def test_compiled_in_place_state_dict_and_checkpoints_unchanged(tiny_cfg, tmp_path):
    eager = build_model(tiny_cfg)
    cfg = _compile_cfg(tiny_cfg.clone(), "inductor", MODULES=["backbone", "transformer"])
    compiled = Trainer.build_model(cfg)  # the training / --eval-only path
    assert compiled.state_dict().keys() == eager.state_dict().keys()
    assert [n for n, _ in compiled.named_parameters()] == [n for n, _ in eager.named_parameters()]
    for name in ("backbone", "transformer"):
        assert compiled.get_submodule(name)._compiled_call_impl is not None, name
    assert compiled.criterion._compiled_call_impl is None and compiled._compiled_call_impl is None
    assert set(compile_report(compiled).modules) == {"backbone", "transformer"}

    # A compiled model's checkpoint loads into an eager one and back, every tensor equal.
    Dinodet2Checkpointer(compiled, save_dir=str(tmp_path)).save("compiled")
    Dinodet2Checkpointer(eager).load(str(tmp_path / "compiled.pth"))
    for key, value in compiled.state_dict().items():
        assert torch.equal(eager.state_dict()[key], value), key


# ------------------------------------------------------------------------------------------------
# correctness (aot_eager)
# ------------------------------------------------------------------------------------------------
def test_compiled_matches_eager_inference_and_trains(tiny_cfg):
    """The improved decoder (SFP levels, deformable encoder / decoder, two-stage, denoising) compiled
    with aot_eager: the same detections as eager, and a training step with finite losses and
    gradients. Tolerance 1e-5: AOTAutograd's decompositions change float32 summation order (measured
    differences up to 3e-7, a few ulps); a wrong level size or a stale cached tensor would be off by
    far more. The backbone and the transformer compile without graph breaks."""
    cfg = tiny_cfg
    cfg.merge_from_list(IMPROVED)
    torch.manual_seed(0)
    eager = build_model(cfg).eval()
    compiled = build_model(cfg).eval()
    compiled.load_state_dict(eager.state_dict())
    compile_model(_compile_cfg(cfg.clone(), MODEL_BACKEND, DYNAMIC=None, MODULES=["backbone", "transformer"]), compiled)
    batch = _inference_batch()
    with torch.no_grad():
        expected, got = eager(batch), compiled(batch)
    for e, g in zip(expected, got):
        e, g = e["instances"], g["instances"]
        torch.testing.assert_close(g.pred_boxes.tensor, e.pred_boxes.tensor, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(g.scores, e.scores, rtol=1e-5, atol=1e-5)
        assert torch.equal(g.pred_classes, e.pred_classes)

    compiled.train()
    losses = compiled(make_train_batch())
    assert all(torch.isfinite(v).all() for v in losses.values()), losses
    sum(losses.values()).backward()
    grads = [p.grad for p in compiled.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert compiled.backbone.net.vit.encoder.layer[0].attention.q_proj.lora_B.default.weight.grad.abs().sum() > 0

    report = compile_report(compiled)
    for name, state in report.modules.items():
        assert state.fallback is None, (name, state.fallback)
        assert state.graph_breaks == 0, (name, dict(state.reasons))
        assert state.compilations == 2 and state.graphs == 2, (name, state)  # eval + train


def test_level_sizes_come_from_the_tokens_without_a_graph_break():
    """Deformable attention reads the level sizes of MultiLevelTokens' spatial shapes as Python ints:
    no data-dependent ``tolist()``, so the sampling compiles as one graph, equal to eager."""
    from torch._dynamo.utils import counters

    from dinodet2.modeling.transformer.deformable_attention import ms_deform_attn_sampling
    from dinodet2.modeling.transformer.multilevel_tokens import MultiLevelTokens

    torch.manual_seed(0)
    sizes = [(6, 4), (3, 2)]
    feats = [torch.randn(2, 8, h, w) for h, w in sizes]
    tokens = MultiLevelTokens.from_levels(feats, feats, [torch.zeros(2, h, w, dtype=torch.bool) for h, w in sizes])
    assert tokens.spatial_shapes.level_sizes == tuple(sizes) and tokens.spatial_shapes.tolist() == [[6, 4], [3, 2]]
    value = torch.randn(2, 30, 2, 4)
    locations, weights = torch.rand(2, 5, 2, 2, 3, 2), torch.rand(2, 5, 2, 2, 3)
    expected = ms_deform_attn_sampling(value, tokens.spatial_shapes, locations, weights)
    got = torch.compile(ms_deform_attn_sampling, backend="eager", fullgraph=True)(
        value, tokens.spatial_shapes, locations, weights)
    assert torch.equal(got, expected) and sum(counters["graph_break"].values()) == 0
    plain = torch.tensor(sizes)  # any other [L, 2] tensor: read with tolist(), same result
    assert torch.equal(ms_deform_attn_sampling(value, plain, locations, weights), expected)


# ------------------------------------------------------------------------------------------------
# graph breaks: counted, logged, in the training metrics
# ------------------------------------------------------------------------------------------------
def test_graph_breaks_are_counted_logged_and_reported_as_metrics(tiny_cfg, caplog):
    model = compile_model(_toy_cfg(tiny_cfg), _Toy(graph_break=True))
    x = torch.randn(3, 4)
    with caplog.at_level(logging.INFO, logger="dinodet2.engine.compilation"):
        expected = model.head(model.backbone._call_impl(x))  # eager
        assert torch.equal(model(x), expected)
        model(x)  # cached: nothing new
    state = compile_report(model).modules["backbone"]
    assert state.calls == 2 and state.compilations == 1 and state.graphs >= 1 and state.graph_breaks >= 1
    assert any("Data dependent" in reason or "item" in reason for reason in state.reasons), dict(state.reasons)
    log = caplog.text
    assert "torch.compile of `backbone`" in log and "graph break(s)" in log and "TORCH_LOGS=graph_breaks" in log

    hook = CompileMetricsHook(model)
    with EventStorage() as storage:
        hook.trainer = types.SimpleNamespace(storage=storage)
        hook.after_step()
        latest = {k: v for k, (v, _) in storage.latest().items()}
    assert latest["compile/graph_breaks"] == state.graph_breaks and latest["compile/graphs"] == state.graphs
    assert latest["compile/compilations"] == 1 and latest["compile/eager_fallbacks"] == 0


# ------------------------------------------------------------------------------------------------
# fallback
# ------------------------------------------------------------------------------------------------
def _broken_backend(gm, example_inputs):
    raise RuntimeError("InvalidCxxCompiler: no working C++ compiler found (simulated)")


def test_failure_at_the_first_call_falls_back_to_eager(tiny_cfg, monkeypatch, caplog):
    """Compilation errors surface at the first call: the model answers eagerly with the same result."""
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: real_compile(fn, backend=_broken_backend))
    torch.manual_seed(0)
    eager = build_model(tiny_cfg).eval()
    model = build_model(tiny_cfg).eval()
    model.load_state_dict(eager.state_dict())
    compile_model(_compile_cfg(tiny_cfg.clone(), "inductor", MODULES=["backbone", "transformer"]), model)
    batch = _inference_batch()
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="dinodet2.engine.compilation"):
        got, expected = model(batch), eager(batch)
        again = model(batch)
    for g, a, e in zip(got, again, expected):
        assert torch.equal(g["instances"].scores, e["instances"].scores)
        assert torch.equal(a["instances"].pred_boxes.tensor, e["instances"].pred_boxes.tensor)
    for name in ("backbone", "transformer"):
        assert model.get_submodule(name)._compiled_call_impl is None
        assert "simulated" in compile_report(model).modules[name].fallback
        assert f"torch.compile of `{name}`" in caplog.text
    assert "failed at its first call" in caplog.text and "runs eagerly from now on" in caplog.text
    assert "InvalidCxxCompiler" in caplog.text
    assert compile_report(model).totals()["eager_fallbacks"] == 2


def test_backward_compile_failure_is_caught_at_the_forward_call(tiny_cfg, monkeypatch, caplog):
    """AOTAutograd would compile the backward graph at the first backward(); here it is compiled with
    the forward graph, so its failure also falls back (and backward then runs eagerly)."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    def bw_fails(gm, example_inputs):
        raise RuntimeError("backward backend failed (simulated)")

    backend = aot_autograd(fw_compiler=lambda gm, _: make_boxed_func(gm.forward), bw_compiler=bw_fails)
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: real_compile(fn, backend=backend))
    model = compile_model(_toy_cfg(tiny_cfg), _Toy())
    x = torch.randn(3, 4)
    with caplog.at_level(logging.WARNING, logger="dinodet2.engine.compilation"):
        model(x).sum().backward()
    assert "backward backend failed" in caplog.text and model.backbone._compiled_call_impl is None
    assert all(p.grad is not None for p in model.parameters())


def test_unavailable_torch_compile_leaves_the_model_eager(tiny_cfg, monkeypatch, caplog):
    def unavailable(fn, **kwargs):
        raise RuntimeError("torch.compile is not supported on this Python (simulated)")

    monkeypatch.setattr(torch, "compile", unavailable)
    with caplog.at_level(logging.WARNING, logger="dinodet2.engine.compilation"):
        model = compile_model(_toy_cfg(tiny_cfg), _Toy())
    assert model.backbone._compiled_call_impl is None and "is unavailable" in caplog.text
    assert compile_report(model).totals()["eager_fallbacks"] == 1
    x = torch.randn(2, 4)
    assert model(x).shape == (2, 2)


def test_the_models_own_errors_are_raised_and_compilation_kept(tiny_cfg):
    """When the eager call fails as well, the error is the model's: raised, and nothing falls back."""
    model = compile_model(_toy_cfg(tiny_cfg), _Toy())
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        model(torch.randn(3, 5))
    assert model.backbone._compiled_call_impl is not None
    assert compile_report(model).modules["backbone"].fallback is None
    assert model(torch.randn(3, 4)).shape == (3, 2)
