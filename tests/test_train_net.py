"""End-to-end tests of ``tools/train_net.py``, each run in a subprocess on CPU.

Every run uses the demo config (``configs/Demo/detr_shapes_tiny.yaml``) shrunk on the command line
to a model of ~80k parameters, so that a run takes seconds on 2 cores. The shapes dataset is
generated once per session under a temporary ``$DETECTRON2_DATASETS``.

Evaluating the registered 60-image ``shapes_val`` costs ~10-20 s per evaluation on 2 busy
cores, so the runs that evaluate go through a small launcher (written to a temporary
directory) that registers an 8-image shapes split, ``shapes_val_small``, and then calls
``train_net.invoke_main()`` -- exactly what ``tools/train_net.py``'s ``__main__`` block does.
Every other run executes ``tools/train_net.py`` itself.
"""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
TRAIN_NET = REPO_ROOT / "tools" / "train_net.py"
CONFIG = REPO_ROOT / "configs" / "Demo" / "detr_shapes_tiny.yaml"

SMALL_VAL = "shapes_val_small"
SMALL_VAL_IMAGES = 8

# Shrinks the demo model / data pipeline so that one iteration takes well under a second.
TINY_OPTS = [
    "MODEL.DINOV2.HIDDEN_SIZE", "32",
    "MODEL.DINOV2.NUM_LAYERS", "2",
    "MODEL.DINOV2.NUM_HEADS", "2",
    "MODEL.DETR.HIDDEN_DIM", "32",
    "MODEL.DETR.NHEADS", "2",
    "MODEL.DETR.DEC_LAYERS", "2",
    "MODEL.DETR.DIM_FEEDFORWARD", "64",
    "MODEL.DETR.NUM_QUERIES", "10",
    "SOLVER.IMS_PER_BATCH", "2",
    "DATALOADER.NUM_WORKERS", "0",
]
NO_EVAL_OPTS = ["DATASETS.TEST", "()"]

TRAIN_TIMEOUT = 400  # seconds; a run normally takes 10-40 s
FAIL_TIMEOUT = 180  # runs that must fail early (before building the model / during setup)

_LAUNCHER = '''\
"""Register a small shapes validation split, then run tools/train_net.py's entry point."""
import os
import sys

REPO_ROOT = {repo_root!r}
sys.path.insert(0, REPO_ROOT)
sys.path.insert(0, os.path.join(REPO_ROOT, "tools"))

from dinodet2.data import default_shapes_root, register_shapes_dataset  # noqa: E402

register_shapes_dataset({name!r}, default_shapes_root(), "val_small", {num_images}, seed=1)

import train_net  # noqa: E402

if __name__ == "__main__":
    train_net.invoke_main()
'''


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
def _tail(text, n=3000):
    text = text or ""
    return text if len(text) <= n else "...\n" + text[-n:]


def _describe(proc):
    return (
        f"command: {' '.join(map(str, proc.args))}\nreturncode: {proc.returncode}\n"
        f"----- stdout (tail) -----\n{_tail(proc.stdout)}\n"
        f"----- stderr (tail) -----\n{_tail(proc.stderr)}"
    )


def _run(script, args, env, timeout, config=CONFIG):
    cmd = [sys.executable, str(script), "--config-file", str(config), *map(str, args)]
    try:
        return subprocess.run(
            cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else e.stdout
        err = e.stderr.decode() if isinstance(e.stderr, bytes) else e.stderr
        pytest.fail(
            f"timed out after {timeout}s: {' '.join(cmd)}\n"
            f"----- stdout (tail) -----\n{_tail(out)}\n----- stderr (tail) -----\n{_tail(err)}"
        )


def _run_ok(script, args, env, timeout=TRAIN_TIMEOUT, config=CONFIG):
    proc = _run(script, args, env, timeout, config)
    assert proc.returncode == 0, "train_net.py failed\n" + _describe(proc)
    return proc


def _run_failing(args, env, timeout=FAIL_TIMEOUT):
    proc = _run(TRAIN_NET, args, env, timeout)
    assert proc.returncode != 0, "train_net.py was expected to fail\n" + _describe(proc)
    return proc


def _copypaste(text):
    """The values of Detectron2's ``copypaste:`` lines (task, metric names, metric values)."""
    return [m.group(1).strip() for m in re.finditer(r"copypaste: (.*)", text)]


def _metrics_records(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _load_checkpoint(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def _same_float(a, b):
    return (a != a and b != b) or a == b  # NaN == NaN for metrics like APl with no large boxes


# ------------------------------------------------------------------------------------------------
# fixtures
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def datasets_root(tmp_path_factory):
    """``$DETECTRON2_DATASETS`` for the whole session; the shapes splits are generated here."""
    return tmp_path_factory.mktemp("detectron2_datasets")


@pytest.fixture(scope="session")
def run_env(datasets_root):
    env = dict(os.environ)
    env.update(
        DETECTRON2_DATASETS=str(datasets_root),
        HF_HUB_OFFLINE="1",
        PYTHONUNBUFFERED="1",
    )
    return env


@pytest.fixture(scope="session")
def launcher(tmp_path_factory):
    path = tmp_path_factory.mktemp("launcher") / "train_net_small_val.py"
    path.write_text(
        _LAUNCHER.format(repo_root=str(REPO_ROOT), name=SMALL_VAL, num_images=SMALL_VAL_IMAGES)
    )
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, run_env, launcher):
    """6 iterations of training (checkpoint every 3) with evaluation on ``shapes_val_small``."""
    out = tmp_path_factory.mktemp("train6")
    proc = _run_ok(
        launcher,
        [*TINY_OPTS, "SOLVER.MAX_ITER", "6", "SOLVER.CHECKPOINT_PERIOD", "3",
         "DATASETS.TEST", f'("{SMALL_VAL}",)', "OUTPUT_DIR", out],
        run_env,
    )
    return out, proc


# ------------------------------------------------------------------------------------------------
# 1. train -> evaluate; --eval-only reproduces the evaluation
# ------------------------------------------------------------------------------------------------
def test_train_writes_checkpoint_log_metrics_and_evaluates(trained):
    out, proc = trained
    assert (out / "model_final.pth").is_file(), sorted(p.name for p in out.iterdir())
    assert (out / "model_0000002.pth").is_file() and (out / "model_0000005.pth").is_file()
    assert (out / "last_checkpoint").read_text().strip() == "model_final.pth"
    assert (out / "config.yaml").is_file()

    log = (out / "log.txt").read_text()
    assert "copypaste: AP,AP50" in log, _describe(proc)
    assert "copypaste: AP,AP50" in proc.stdout, _describe(proc)
    assert "Starting training from iteration 0" in log

    records = _metrics_records(out / "metrics.json")
    losses = [r for r in records if "total_loss" in r]
    assert losses, records
    assert losses[-1]["iteration"] == 5
    assert all(r["total_loss"] == r["total_loss"] and r["total_loss"] > 0 for r in losses)
    assert any("bbox/AP" in r for r in records), "final evaluation not recorded in metrics.json"

    results = json.loads((out / "inference" / SMALL_VAL / "coco_instances_results.json").read_text())
    assert results, "no detections written"
    assert {r["image_id"] for r in results} <= set(range(1, SMALL_VAL_IMAGES + 1))


def test_eval_only_reproduces_final_evaluation(trained, tmp_path, run_env, launcher):
    train_out, train_proc = trained
    eval_out = tmp_path / "eval"
    proc = _run_ok(
        launcher,
        ["--eval-only", *TINY_OPTS, "MODEL.WEIGHTS", train_out / "model_final.pth",
         "DATASETS.TEST", f'("{SMALL_VAL}",)', "OUTPUT_DIR", eval_out],
        run_env,
    )
    assert f"Loading from {train_out / 'model_final.pth'}" in proc.stdout, _describe(proc)

    # Same printed metrics as the evaluation at the end of training.
    train_cp = _copypaste((train_out / "log.txt").read_text())
    eval_cp = _copypaste(proc.stdout)
    assert len(train_cp) == 3 and train_cp[1].startswith("AP,AP50"), train_cp
    assert eval_cp == train_cp, _describe(proc)

    # ... and the same numbers as the final bbox metrics recorded in metrics.json.
    final = [r for r in _metrics_records(train_out / "metrics.json") if "bbox/AP" in r][-1]
    names, values = eval_cp[1].split(","), [float(v) for v in eval_cp[2].split(",")]
    for name, value in zip(names, values):
        assert _same_float(round(final[f"bbox/{name}"], 4), value), (name, final, eval_cp)

    # Identical detections (boxes, scores, classes), not just identical (possibly all-zero) APs.
    rel = Path("inference") / SMALL_VAL / "coco_instances_results.json"
    train_dets = json.loads((train_out / rel).read_text())
    eval_dets = json.loads((eval_out / rel).read_text())
    assert len(eval_dets) == len(train_dets)
    for a, b in zip(train_dets, eval_dets):
        assert (a["image_id"], a["category_id"]) == (b["image_id"], b["category_id"])
        assert b["score"] == pytest.approx(a["score"], rel=1e-6, abs=1e-7)
        assert b["bbox"] == pytest.approx(a["bbox"], rel=1e-6, abs=1e-4)


# ------------------------------------------------------------------------------------------------
# 2. the checkpoint is a plain, weights_only-loadable state
# ------------------------------------------------------------------------------------------------
def test_checkpoint_loads_with_weights_only(trained):
    out, _ = trained
    ckpt = _load_checkpoint(out / "model_final.pth")
    assert "model" in ckpt and "iteration" in ckpt, sorted(ckpt)
    assert ckpt["iteration"] == 5
    from detectron2.data import MetadataCatalog

    # the training dataset's class names travel with the model (tools/demo.py names detections)
    assert ckpt["thing_classes"] == MetadataCatalog.get("shapes_train").thing_classes
    model = ckpt["model"]
    assert model and all(isinstance(v, torch.Tensor) for v in model.values())
    assert any(".lora_" in k for k in model), "LoRA adapter weights missing from the checkpoint"
    assert not any(k.startswith("module.") for k in model)
    assert _load_checkpoint(out / "model_0000002.pth")["iteration"] == 2


# ------------------------------------------------------------------------------------------------
# 3. --resume continues from OUTPUT_DIR/last_checkpoint
# ------------------------------------------------------------------------------------------------
def _warmup_factor(iteration, max_iter, warmup_factor=0.001):
    """Detectron2's linear warmup when WARMUP_ITERS >= MAX_ITER (warmup spans the whole run)."""
    return warmup_factor + (1 - warmup_factor) * iteration / max_iter


def test_resume_continues_from_last_checkpoint(tmp_path, run_env):
    out = tmp_path / "resume"
    lr_opts = ["SOLVER.BASE_LR", "0.001", "SOLVER.WARMUP_ITERS", "100",
               "SOLVER.WARMUP_FACTOR", "0.001", "SOLVER.WARMUP_METHOD", "linear"]
    common = [*TINY_OPTS, *NO_EVAL_OPTS, *lr_opts, "SOLVER.CHECKPOINT_PERIOD", "2",
              "OUTPUT_DIR", out]

    first = _run_ok(TRAIN_NET, [*common, "SOLVER.MAX_ITER", "4"], run_env)
    assert "Starting training from iteration 0" in first.stdout, _describe(first)
    assert (out / "last_checkpoint").read_text().strip() == "model_final.pth"
    assert _load_checkpoint(out / "model_final.pth")["iteration"] == 3
    n_first = len(_metrics_records(out / "metrics.json"))
    first_lr = [r for r in _metrics_records(out / "metrics.json") if r.get("iteration") == 3]
    assert first_lr, _metrics_records(out / "metrics.json")

    second = _run_ok(TRAIN_NET, ["--resume", *common, "SOLVER.MAX_ITER", "6"], run_env)
    assert f"Loading from {out / 'model_final.pth'}" in second.stdout, _describe(second)
    assert "No checkpoint found" not in second.stdout, _describe(second)
    assert "Starting training from iteration 4" in second.stdout, _describe(second)
    assert "Starting training from iteration 0" not in second.stdout, _describe(second)

    # The second run appends to metrics.json; it must only have run iterations 4 and 5.
    records = _metrics_records(out / "metrics.json")
    new = [r for r in records[n_first:] if "iteration" in r]
    assert new and all(r["iteration"] >= 4 for r in new), new
    assert max(r["iteration"] for r in new) == 5, new

    ckpt = _load_checkpoint(out / "model_final.pth")
    assert ckpt["iteration"] == 5
    assert ckpt["trainer"]["iteration"] == 5

    # The LR scheduler resumed too: LR at iteration 5 of a 6-iteration warmup, not at iteration 1.
    # (Ratio to the first run's LR at iteration 3 of 4, to be independent of the param group.)
    lr5 = [r for r in new if r["iteration"] == 5][-1]["lr"]
    lr3 = first_lr[-1]["lr"]
    expected = _warmup_factor(5, 6) / _warmup_factor(3, 4)
    assert lr5 / lr3 == pytest.approx(expected, rel=1e-6), (lr5, lr3)


# ------------------------------------------------------------------------------------------------
# 4. two-process CPU DDP (gloo)
# ------------------------------------------------------------------------------------------------
IMPROVED_CONFIG = REPO_ROOT / "configs" / "Demo" / "detr_shapes_tiny_improved.yaml"


AUG_CURRICULUM_OPTS = [
    "INPUT.AUG.MOSAIC.ENABLED", "True", "INPUT.AUG.MOSAIC.PROB", "1.0", "INPUT.AUG.MOSAIC.SIZE", "112",
    "INPUT.AUG.MIXUP.ENABLED", "True", "INPUT.AUG.MIXUP.LABEL_WEIGHTING", "True",
    "INPUT.AUG.COPY_PASTE.ENABLED", "True", "INPUT.AUG.STRONG_OFF_LAST_ITERS", "1",
    "CURRICULUM.SAMPLING.ENABLED", "True", "CURRICULUM.SAMPLING.RAMP_ITERS", "2",
    "CURRICULUM.QUERIES.ENABLED", "True", "CURRICULUM.QUERIES.START_QUERIES", "4", "CURRICULUM.QUERIES.RAMP_ITERS", "2",
    "CURRICULUM.MATCHING.ENABLED", "True", "CURRICULUM.MATCHING.STEPS", "[1,2]",
]


# the sparse encoder's token scorer learns from its own loss only: it must get a gradient every step
SPARSE_ENCODER_OPTS = ["MODEL.DETR.SPARSE_ENCODER.ENABLED", "True", "MODEL.DETR.SPARSE_ENCODER.KEEP_RATIO", "0.3"]


@pytest.mark.parametrize("config, extra_opts", [(CONFIG, []), (IMPROVED_CONFIG, []),
                                                (IMPROVED_CONFIG, AUG_CURRICULUM_OPTS),
                                                (IMPROVED_CONFIG, SPARSE_ENCODER_OPTS)],
                         ids=["demo", "improved_decoder", "improved_with_augmentation_and_curriculum",
                              "improved_sparse_encoder"])
def test_two_process_cpu_ddp(tmp_path, run_env, config, extra_opts):
    """DDP without find_unused_parameters: any parameter left without gradient (two-stage,
    denoising, deformable, fewer queries) would make the second iteration fail; the curriculum
    sampler's shared seed and the loader rebuilt at the augmentation switch must work per rank."""
    out = tmp_path / "ddp"
    env = dict(run_env, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = _run_ok(
        TRAIN_NET,
        ["--num-gpus", "2", "--dist-url", "auto", *TINY_OPTS, *NO_EVAL_OPTS, "MODEL.SFP.OUT_CHANNELS", "32",
         "SOLVER.MAX_ITER", "3", "SOLVER.CHECKPOINT_PERIOD", "100", "OUTPUT_DIR", out, *extra_opts],
        env, config=config,
    )
    log = (out / "log.txt").read_text()
    assert "World size: 2" in log, _describe(proc)
    # IMS_PER_BATCH 2 over 2 processes: one image per process.
    assert "batch_size=1" in log, _describe(proc)
    assert (out / "log.txt.rank1").is_file(), "rank 1 did not run"
    assert _load_checkpoint(out / "model_final.pth")["iteration"] == 2
    model = _load_checkpoint(out / "model_final.pth")["model"]
    assert not any(k.startswith("module.") for k in model), "DDP wrapper leaked into checkpoint"
    if extra_opts is AUG_CURRICULUM_OPTS:
        assert "strong multi-image augmentation off" in log and "Curriculum sampling over" in log, _describe(proc)


def test_two_process_cpu_ddp_resume_is_exact(tmp_path, run_env):
    """Resuming a 2-rank run from its iteration-2 checkpoint (what a kill after that checkpoint
    leaves) ends with the uninterrupted run's weights, with augmentation and curriculum on."""
    env = dict(run_env, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    opts = ["--num-gpus", "2", "--dist-url", "auto", *TINY_OPTS, *NO_EVAL_OPTS, "MODEL.SFP.OUT_CHANNELS", "32",
            "SOLVER.MAX_ITER", "5", "SOLVER.CHECKPOINT_PERIOD", "3", "SEED", "-1", *AUG_CURRICULUM_OPTS,
            "DATALOADER.NUM_WORKERS", "1"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _run_ok(TRAIN_NET, [*opts, "OUTPUT_DIR", straight], env, config=IMPROVED_CONFIG)
    resumed.mkdir()
    shutil.copy(straight / "model_0000002.pth", resumed / "model_0000002.pth")
    (resumed / "last_checkpoint").write_text("model_0000002.pth")
    proc = _run_ok(TRAIN_NET, ["--resume", *opts, "OUTPUT_DIR", resumed], env, config=IMPROVED_CONFIG)
    log = (resumed / "log.txt").read_text()
    assert "Resuming with the run's seed" in log, _describe(proc)  # SEED -1: the drawn seed comes back
    a, b = _load_checkpoint(straight / "model_final.pth")["model"], _load_checkpoint(resumed / "model_final.pth")["model"]
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


# ------------------------------------------------------------------------------------------------
# 5-7. clear errors
# ------------------------------------------------------------------------------------------------
def test_amp_on_cpu_fails_with_clear_message(tmp_path, run_env):
    proc = _run_failing(
        [*TINY_OPTS, *NO_EVAL_OPTS, "SOLVER.MAX_ITER", "2", "SOLVER.AMP.ENABLED", "True",
         "OUTPUT_DIR", tmp_path / "amp"],
        run_env,
    )
    assert "SOLVER.AMP.ENABLED" in proc.stderr, _describe(proc)
    last = proc.stderr.strip().splitlines()[-1]
    assert "SOLVER.AMP.ENABLED" in last and "CUDA" in last, last
    assert not last.startswith("AssertionError"), last
    assert not (tmp_path / "amp" / "model_final.pth").exists()


def test_missing_dataset_names_detectron2_datasets_and_path(tmp_path, run_env):
    empty = tmp_path / "empty_datasets"
    empty.mkdir()
    env = dict(run_env, DETECTRON2_DATASETS=str(empty))
    proc = _run_failing(
        [*TINY_OPTS, "DATASETS.TRAIN", '("coco_2017_train",)', "SOLVER.MAX_ITER", "2",
         "OUTPUT_DIR", tmp_path / "missing"],
        env,
    )
    output = proc.stdout + proc.stderr
    assert "DETECTRON2_DATASETS" in output, _describe(proc)
    expected = str(empty / "coco" / "annotations" / "instances_train2017.json")
    assert expected in output, _describe(proc)
    assert not list(empty.iterdir()), "nothing should be generated for a missing COCO dataset"


def test_unknown_config_key_fails_naming_it(tmp_path, run_env):
    proc = _run_failing(
        [*TINY_OPTS, "MODEL.DETR.NUM_QUERYS", "5", "OUTPUT_DIR", tmp_path / "badkey"],
        run_env,
    )
    assert "MODEL.DETR.NUM_QUERYS" in proc.stderr, _describe(proc)
    assert not (tmp_path / "badkey" / "model_final.pth").exists()


# ------------------------------------------------------------------------------------------------
# 8. DefaultPredictor + Visualizer on the trained checkpoint (tools/visualize_predictions.py)
# ------------------------------------------------------------------------------------------------
def test_visualize_predictions_draws_pngs_with_default_predictor(trained, tmp_path, run_env):
    train_out, _ = trained
    pictures = tmp_path / "pictures"
    proc = _run_ok(
        REPO_ROOT / "tools" / "visualize_predictions.py",
        ["--output", pictures, "--num-images", "2", "--score-threshold", "0",
         *TINY_OPTS, "MODEL.WEIGHTS", train_out / "model_final.pth"],
        run_env,
    )
    pngs = sorted(pictures.glob("*.png"))
    assert len(pngs) == 2, _describe(proc)
    # every detection above score 0 is drawn: the demo's focal head keeps the top
    # TEST.DETECTIONS_PER_IMAGE=20 of NUM_QUERIES (10) x classes (3) per image
    assert proc.stdout.count(": 20 detections") == 2, _describe(proc)
    import cv2

    assert all(cv2.imread(str(p)) is not None for p in pngs)


# ------------------------------------------------------------------------------------------------
# 8. trainable-only checkpoints on top of a pretrained (saved) DINOv2: resume, --eval-only,
#    DefaultPredictor
# ------------------------------------------------------------------------------------------------
def test_trainable_only_checkpoints_resume_evaluate_and_predict(tmp_path, run_env, launcher, saved_dinov2_dir):
    out = tmp_path / "small_ckpt"
    pretrained = ["MODEL.DINOV2.RANDOM_INIT", "False", "MODEL.DINOV2.NAME", saved_dinov2_dir,
                  "MODEL.DINOV2.FREEZE", "True", "SOLVER.CHECKPOINT_TRAINABLE_ONLY", "True"]
    common = [*TINY_OPTS, *NO_EVAL_OPTS, *pretrained, "SOLVER.CHECKPOINT_PERIOD", "2", "OUTPUT_DIR", out]
    _run_ok(TRAIN_NET, [*common, "SOLVER.MAX_ITER", "4"], run_env)
    ckpt = _load_checkpoint(out / "model_final.pth")
    assert ckpt["dinodet2_format"] == "trainable_only" and ckpt["iteration"] == 3
    assert not any(k.endswith("attention.q_proj.base_layer.weight") for k in ckpt["model"])
    assert any(".lora_A." in k for k in ckpt["model"])

    second = _run_ok(TRAIN_NET, ["--resume", *common, "SOLVER.MAX_ITER", "6"], run_env)
    assert "Starting training from iteration 4" in second.stdout, _describe(second)

    evaluated = _run_ok(launcher, ["--eval-only", *TINY_OPTS, *pretrained, "MODEL.WEIGHTS", out / "model_final.pth",
                                   "DATASETS.TEST", f'("{SMALL_VAL}",)', "OUTPUT_DIR", tmp_path / "eval"], run_env)
    assert _copypaste(evaluated.stdout + evaluated.stderr), _describe(evaluated)

    from detectron2.config import get_cfg
    from detectron2.engine import DefaultPredictor

    from dinodet2 import add_dinodet2_config

    cfg = get_cfg()
    add_dinodet2_config(cfg)
    cfg.merge_from_file(str(CONFIG))
    cfg.merge_from_list([*TINY_OPTS, *pretrained, "MODEL.WEIGHTS", str(out / "model_final.pth"), "MODEL.DEVICE", "cpu"])
    predictor = DefaultPredictor(cfg)
    result = predictor((torch.rand(80, 100, 3) * 255).to(torch.uint8).numpy())
    assert result["instances"].image_size == (80, 100)


# ------------------------------------------------------------------------------------------------
# 9. MODEL.COMPILE: training and evaluation compiled, counts in the metrics, a failing module eager
# ------------------------------------------------------------------------------------------------
_NO_RELU_BACKEND = '''
import torch  # noqa: E402


def no_relu(gm, example_inputs):
    """Runs graphs without ReLU eagerly (as the "eager" backend) and fails to compile the others."""
    if any(node.target in (torch.relu, torch.nn.functional.relu) for node in gm.graph.nodes):
        raise RuntimeError("this backend cannot compile ReLU (simulated compiler failure)")
    return gm.forward


torch._dynamo.register_backend(no_relu, name="dinodet2_test_no_relu")

'''


def test_compiled_training_and_evaluation_with_an_eager_fallback(tmp_path, run_env):
    """MODEL.COMPILE in a real run, with a backend (registered by the launcher) that compiles the
    backbone (GELU) and fails on the transformer (ReLU in its FFNs and box head) at its first call:
    the backbone trains and evaluates compiled, the transformer eagerly, and the counts are in the
    metrics."""
    launcher = tmp_path / "train_net_no_relu_backend.py"
    text = _LAUNCHER.format(repo_root=str(REPO_ROOT), name=SMALL_VAL, num_images=SMALL_VAL_IMAGES)
    entry = "import train_net  # noqa: E402"
    launcher.write_text(text.replace(entry, _NO_RELU_BACKEND + entry))
    out = tmp_path / "compiled"
    proc = _run_ok(launcher, [*TINY_OPTS, "SOLVER.MAX_ITER", "3", "DATASETS.TEST", f'("{SMALL_VAL}",)',
                              "MODEL.COMPILE.ENABLED", "True", "MODEL.COMPILE.BACKEND", "dinodet2_test_no_relu",
                              "MODEL.COMPILE.MODULES", '["backbone", "transformer"]',
                              "OUTPUT_DIR", out], run_env)
    log = (out / "log.txt").read_text()
    assert "torch.compile of `backbone`" in log and "training call 1: compiled" in log, _describe(proc)
    assert "inference call" in log, "the evaluation did not run the compiled backbone\n" + _describe(proc)
    assert re.search(r"torch.compile of `transformer` .* failed at its first call: .*simulated compiler failure",
                     log), _describe(proc)
    assert "`transformer` runs eagerly from now on" in log
    scalars = [r for r in _metrics_records(out / "metrics.json") if "compile/graphs" in r]
    assert scalars and scalars[-1]["compile/eager_fallbacks"] == 1 and scalars[-1]["compile/graphs"] >= 1, scalars
    assert scalars[-1]["compile/graph_breaks"] == 0, log
    assert all(r["total_loss"] == r["total_loss"] for r in scalars)
    assert _copypaste(proc.stdout + proc.stderr), _describe(proc)
