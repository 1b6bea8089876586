"""Checkpoint safety: weights files are read without running code from them, unreadable files
fail with one clear error naming them, checkpoints are written atomically and never with NaN/Inf,
and ``--resume`` falls back to the newest readable checkpoint."""
import io
import logging
import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from detectron2.modeling import build_model

import dinodet2.engine.checkpoint as checkpoint_module
from dinodet2.engine import Dinodet2Checkpointer
from dinodet2.engine.weights_file import WeightsFileError, read_checkpoint_file

from conftest import TINY_CONFIG, load_tool

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_OPTS = ["MODEL.DINOV2.HIDDEN_SIZE", "32", "MODEL.DINOV2.NUM_LAYERS", "2", "MODEL.DINOV2.NUM_HEADS", "2",
             "MODEL.DETR.HIDDEN_DIM", "32", "MODEL.DETR.NHEADS", "2", "MODEL.DETR.DEC_LAYERS", "2",
             "MODEL.DETR.DIM_FEEDFORWARD", "64", "MODEL.DETR.NUM_QUERIES", "10"]


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
class _CreatesFile:
    """Unpickling this creates ``path``: a stand-in for a payload that runs code."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def _write_malicious(kind, folder):
    """A weights file of format ``kind`` whose unpickling would create ``marker``."""
    marker = folder / f"marker_{kind}"
    path = folder / f"evil.{kind}"
    payload = {"w": _CreatesFile(marker)}
    if kind == "pkl":
        with open(path, "wb") as f:
            pickle.dump({"model": payload, "__author__": "attacker"}, f)
    elif kind == "pyth":
        torch.save({"model_state": payload}, str(path))
    else:
        torch.save({"model": payload}, str(path))
    return path, marker


@pytest.fixture(params=["pkl", "pth", "pyth"])
def malicious(request, tmp_path, monkeypatch):
    # The variable makes torch.load default to weights_only=False: only an explicit
    # weights_only=True keeps a .pth / .pyth from running code.
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    return _write_malicious(request.param, tmp_path)


def _assert_refused(error, path, marker):
    assert not marker.exists(), "the pickle payload ran"
    message = str(error.value)
    assert str(path) in message and "open" in message and "torch.save" in message, message


class _Python2Pickler(pickle._Pickler):
    """Writes ``bytes`` the way Python 2 wrote ``str`` (SHORT_BINSTRING / BINSTRING): Python 3
    reads them back as ``str`` decoded with the unpickler's ``encoding``, as for Detectron1 files."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_python2_str(self, obj):
        size = len(obj)
        opcode = pickle.SHORT_BINSTRING + bytes([size]) if size < 256 else pickle.BINSTRING + struct.pack("<i", size)
        self.write(opcode + obj)
        self.memoize(obj)

    dispatch[bytes] = save_python2_str


def _python2_pickle(obj) -> bytes:
    buffer = io.BytesIO()
    _Python2Pickler(buffer, protocol=2).dump(obj)
    # numpy >= 2 names its module numpy._core; files of the Python 2 era say numpy.core.
    return buffer.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


def _small_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))


def _save_iterations(folder, iterations, **kwargs):
    """Checkpoints model_<it>.pth whose Linear weight is filled with ``it``; returns the checkpointer."""
    model = _small_model()
    checkpointer = Dinodet2Checkpointer(model, str(folder), **kwargs)
    for it in iterations:
        with torch.no_grad():
            model[0].weight.fill_(it)
        checkpointer.save(f"model_{it:07d}", iteration=it)
    return checkpointer


def _resume(folder):
    """(returned extra data, the Linear weight value) after resuming a fresh model from ``folder``."""
    model = _small_model(seed=1)
    extra = Dinodet2Checkpointer(model, str(folder)).resume_or_load("", resume=True)
    return extra, model[0].weight.flatten()[0].item()


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _last_checkpoint(folder):
    return (folder / "last_checkpoint").read_text().strip()


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.fixture
def checkpoint_log():
    """Messages logged by the checkpointer and the atomic writer (whatever handlers other tests set)."""
    records = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append
    loggers = [logging.getLogger("dinodet2.engine.checkpoint"), logging.getLogger("dinodet2.engine.atomic_file")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.INFO)
    yield lambda: "\n".join(r.getMessage() for r in records)
    for lg, level in zip(loggers, levels):
        lg.removeHandler(handler)
        lg.setLevel(level)


# ------------------------------------------------------------------------------------------------
# 1. no code runs from a weights file
# ------------------------------------------------------------------------------------------------
def test_load_refuses_a_pickle_payload(malicious):
    path, marker = malicious
    with pytest.raises(WeightsFileError) as error:
        Dinodet2Checkpointer(_small_model()).load(str(path))
    _assert_refused(error, path, marker)


def test_resume_or_load_refuses_a_pickle_payload(malicious, tmp_path):
    path, marker = malicious
    with pytest.raises(WeightsFileError) as error:  # MODEL.WEIGHTS of a fresh run
        Dinodet2Checkpointer(_small_model(), str(tmp_path / "fresh")).resume_or_load(str(path), resume=False)
    _assert_refused(error, path, marker)

    # ... and a file named by last_checkpoint: skipped like an unreadable one, nothing else to resume.
    out = tmp_path / "run"
    out.mkdir()
    (out / "model_0000001.pth").write_bytes(path.read_bytes())
    (out / "last_checkpoint").write_text("model_0000001.pth")
    with pytest.raises(WeightsFileError, match="no checkpoint in it can be read") as error:
        Dinodet2Checkpointer(_small_model(), str(out)).resume_or_load("", resume=True)
    assert "model_0000001.pth" in str(error.value) and not marker.exists()


def test_merge_lora_refuses_a_pickle_payload(malicious, tmp_path):
    path, marker = malicious
    merge_lora = load_tool("merge_lora")
    with pytest.raises(WeightsFileError) as error:
        merge_lora.main(["--config-file", str(TINY_CONFIG), "--weights", str(path),
                         "--output-dir", str(tmp_path / "merged"), *TINY_OPTS])
    _assert_refused(error, path, marker)


def test_visualize_predictions_refuses_a_pickle_payload(malicious, tiny_cfg):
    path, marker = malicious
    tiny_cfg.MODEL.WEIGHTS = str(path)
    with pytest.raises(WeightsFileError) as error:
        load_tool("visualize_predictions").build_predictor(tiny_cfg)
    _assert_refused(error, path, marker)


@pytest.mark.parametrize("kind", ["pkl", "pth"])
def test_train_net_eval_only_refuses_a_pickle_payload(kind, tmp_path):
    path, marker = _write_malicious(kind, tmp_path)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "tools" / "train_net.py"), "--config-file", str(TINY_CONFIG), "--eval-only",
         *TINY_OPTS, "DATASETS.TEST", "()", "MODEL.WEIGHTS", str(path), "OUTPUT_DIR", str(tmp_path / "eval")],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert not marker.exists(), "the pickle payload ran"
    assert "WeightsFileError" in proc.stderr and f"Refused to load weights file '{path}'" in proc.stderr, \
        proc.stderr[-3000:]


# ------------------------------------------------------------------------------------------------
# 2. legitimate model-zoo pickles still load
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_detectron2_model_zoo_pickle_loads(tiny_cfg, tmp_path, protocol):
    torch.manual_seed(0)
    trained = build_model(tiny_cfg)
    weights = {k: v.numpy().copy() for k, v in trained.state_dict().items()}
    path = tmp_path / "model_zoo.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": weights, "__author__": "Detectron2 Model Zoo"}, f, protocol=protocol)
    torch.manual_seed(1)
    fresh = build_model(tiny_cfg)
    Dinodet2Checkpointer(fresh).load(str(path))
    for name, value in trained.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], value), name


def test_python2_caffe2_blobs_pickle_loads_with_latin1(tmp_path):
    conv1_w = np.array([1.5, -2.25, 3e-3, 7.0], dtype=np.float32).reshape(4, 1, 1, 1)
    data = _python2_pickle({b"blobs": {b"conv1_w": conv1_w, b"conv1_w_momentum": np.ones_like(conv1_w)}})
    with pytest.raises(UnicodeDecodeError):
        pickle.loads(data)  # really a Python 2 pickle: its array bytes need encoding="latin1"
    path = tmp_path / "caffe2.pkl"
    path.write_bytes(data)

    checkpoint = read_checkpoint_file(str(path))
    assert checkpoint["__author__"] == "Caffe2" and checkpoint["matching_heuristics"] is True
    assert list(checkpoint["model"]) == ["conv1_w"]  # momentum blobs are no weights

    model = nn.Module()
    model.stem = nn.Module()
    model.stem.conv1 = nn.Conv2d(1, 4, 1, bias=False)
    Dinodet2Checkpointer(model).load(str(path))  # Detectron2's Caffe2 name matching: conv1_w -> stem.conv1.weight
    assert torch.equal(model.stem.conv1.weight.detach(), torch.from_numpy(conv1_w))


# ------------------------------------------------------------------------------------------------
# 3. unreadable files: one error type naming the file
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("content, found", [(b"", "an empty file"),
                                            (b"version https://git-lfs.github.com/spec/v1\n", "git lfs pull"),
                                            (b"<html>404 not found</html>", "a text file")])
@pytest.mark.parametrize("suffix", [".pth", ".pkl"])
def test_unreadable_weights_file_error_names_the_file(tmp_path, content, found, suffix):
    path = tmp_path / f"weights{suffix}"
    path.write_bytes(content)
    with pytest.raises(WeightsFileError, match=found) as error:
        Dinodet2Checkpointer(_small_model()).load(str(path))
    assert f"'{path}'" in str(error.value)


def test_missing_weights_file_error_names_the_file(tmp_path):
    path = tmp_path / "nowhere" / "model_final.pth"
    with pytest.raises(WeightsFileError, match="does not exist") as error:
        Dinodet2Checkpointer(_small_model()).resume_or_load(str(path), resume=False)
    assert str(path) in str(error.value)


# ------------------------------------------------------------------------------------------------
# 4. atomic writes
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("trainable_only", [False, True])
def test_failed_write_leaves_no_partial_file_and_keeps_last_checkpoint(tmp_path, monkeypatch, trainable_only):
    checkpointer = _save_iterations(tmp_path, [1], trainable_only=trainable_only)
    real_save = torch.save

    def half_then_fail(obj, f):
        buffer = io.BytesIO()
        real_save(obj, buffer)
        f.write(buffer.getvalue()[: buffer.tell() // 2])
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        checkpointer.save("model_0000003", iteration=3)
    monkeypatch.undo()

    assert sorted(p.name for p in tmp_path.iterdir()) == ["last_checkpoint", "model_0000001.pth"]
    assert _last_checkpoint(tmp_path) == "model_0000001.pth"
    extra, weight = _resume(tmp_path)
    assert extra["iteration"] == 1 and weight == 1


_KILLED_DURING_SAVE = """
import io, os, sys
sys.path.insert(0, {repo!r})
import torch
from dinodet2.engine.checkpoint import Dinodet2Checkpointer

model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
checkpointer = Dinodet2Checkpointer(model, {out!r})
torch.nn.init.constant_(model[0].weight, 1)
checkpointer.save("model_0000001", iteration=1)
torch.nn.init.constant_(model[0].weight, 3)
real_save = torch.save

def killed_halfway(obj, f):
    buffer = io.BytesIO()
    real_save(obj, buffer)
    f.write(buffer.getvalue()[: buffer.tell() // 2])
    f.flush()
    os._exit(9)  # like SIGKILL: no exception handler, no cleanup runs

torch.save = killed_halfway
checkpointer.save("model_0000003", iteration=3)
"""


def test_process_killed_during_save_leaves_previous_checkpoint_and_resume_cleans_up(tmp_path, checkpoint_log):
    script = tmp_path / "killed.py"
    out = tmp_path / "out"
    script.write_text(_KILLED_DURING_SAVE.format(repo=str(REPO_ROOT), out=str(out)))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 9, proc.stderr[-3000:]

    assert not (out / "model_0000003.pth").exists()
    leftovers = _leftovers(out)
    assert len(leftovers) == 1 and leftovers[0].startswith(".model_0000003.pth.") and leftovers[0].endswith(".tmp")
    assert _last_checkpoint(out) == "model_0000001.pth"

    # Neither Detectron2 nor fvcore take the leftover for a checkpoint ...
    assert [os.path.basename(p) for p in Dinodet2Checkpointer(_small_model(), str(out)).get_all_checkpoint_files()] \
        == ["model_0000001.pth"]
    # ... and resuming removes it and continues from the previous checkpoint.
    extra, weight = _resume(out)
    assert extra["iteration"] == 1 and weight == 1
    assert _leftovers(out) == []
    assert leftovers[0] in checkpoint_log() and "interrupted" in checkpoint_log()


def test_save_leaves_only_the_checkpoint_and_last_checkpoint(tmp_path):
    _save_iterations(tmp_path, [1, 2])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last_checkpoint", "model_0000001.pth", "model_0000002.pth"]
    assert _last_checkpoint(tmp_path) == "model_0000002.pth"
    assert torch.load(str(tmp_path / "model_0000002.pth"), weights_only=True)["iteration"] == 2


# ------------------------------------------------------------------------------------------------
# 5. resume falls back to the newest readable checkpoint
# ------------------------------------------------------------------------------------------------
def _count_reads(monkeypatch):
    """The base names of the files the checkpointer reads, in order."""
    reads = []
    real_read = checkpoint_module.read_checkpoint_file
    monkeypatch.setattr(checkpoint_module, "read_checkpoint_file",
                        lambda p: reads.append(os.path.basename(p)) or real_read(p))
    return reads


def test_resume_skips_truncated_checkpoints_newest_first_and_reads_the_chosen_one_once(tmp_path, monkeypatch,
                                                                                       checkpoint_log):
    _save_iterations(tmp_path, [1, 3, 4, 5])
    _truncate(tmp_path / "model_0000005.pth")  # named by last_checkpoint
    _truncate(tmp_path / "model_0000004.pth")
    reads = _count_reads(monkeypatch)

    extra, weight = _resume(tmp_path)
    assert extra["iteration"] == 3 and weight == 3
    assert reads == ["model_0000005.pth", "model_0000004.pth", "model_0000003.pth"]
    log = checkpoint_log()
    assert "model_0000005.pth" in log and "failed finding central directory" in log
    assert "Resuming from" in log and "model_0000003.pth" in log


def test_resume_from_a_readable_last_checkpoint_reads_it_once(tmp_path, monkeypatch):
    _save_iterations(tmp_path, [1, 2])
    reads = _count_reads(monkeypatch)
    extra, weight = _resume(tmp_path)
    assert extra["iteration"] == 2 and weight == 2
    assert reads == ["model_0000002.pth"]


def test_resume_counts_model_final_as_newest(tmp_path):
    checkpointer = _save_iterations(tmp_path, [7, 9])
    with torch.no_grad():
        checkpointer.model[0].weight.fill_(100)
    checkpointer.save("model_final", iteration=100)
    os.utime(tmp_path / "model_final.pth", (0, 0))  # oldest file on disk: the name decides, not the time
    (tmp_path / "last_checkpoint").write_text("model_0000011.pth")  # deleted by hand, say
    extra, weight = _resume(tmp_path)
    assert extra["iteration"] == 100 and weight == 100


def test_resume_with_no_readable_checkpoint_lists_them(tmp_path):
    _save_iterations(tmp_path, [1, 2])
    _truncate(tmp_path / "model_0000001.pth")
    (tmp_path / "model_0000002.pth").write_bytes(b"")
    with pytest.raises(WeightsFileError, match="no checkpoint in it can be read") as error:
        _resume(tmp_path)
    message = str(error.value)
    assert "model_0000001.pth" in message and "model_0000002.pth" in message and "last_checkpoint" in message


def test_resume_without_checkpoint_loads_the_given_weights_only(tmp_path):
    (tmp_path / "source").mkdir()
    source = _save_iterations(tmp_path / "source", [6])
    model = _small_model(seed=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    extra = Dinodet2Checkpointer(model, str(tmp_path / "run"), optimizer=optimizer).resume_or_load(
        source.get_checkpoint_file(), resume=True)
    assert extra["iteration"] == 6 and model[0].weight.flatten()[0].item() == 6


# ------------------------------------------------------------------------------------------------
# 6. non-finite state is never written
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("trainable_only", [False, True])
def test_save_refuses_nan_weights(tmp_path, trainable_only):
    checkpointer = _save_iterations(tmp_path, [1], trainable_only=trainable_only)
    with torch.no_grad():
        checkpointer.model[0].weight[0, 0] = float("nan")
        checkpointer.model[0].bias[1] = float("inf")
    with pytest.raises(FloatingPointError) as error:
        checkpointer.save("model_0000003", iteration=3)
    message = str(error.value)
    assert "2 tensors" in message and "model/0.weight" in message and "model/0.bias" in message, message
    assert str(tmp_path / "model_0000001.pth") in message and "--resume" in message, message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last_checkpoint", "model_0000001.pth"]
    assert _last_checkpoint(tmp_path) == "model_0000001.pth"


def test_save_refuses_nan_optimizer_state(tmp_path):
    model = _small_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(8, 4)).sum().backward()
    optimizer.step()
    optimizer.state[model[0].weight]["exp_avg_sq"].fill_(float("inf"))
    checkpointer = Dinodet2Checkpointer(model, str(tmp_path), optimizer=optimizer)
    with pytest.raises(FloatingPointError, match=r"1 tensors .*optimizer/state/0/exp_avg_sq") as error:
        checkpointer.save("model_0000000", iteration=0)
    assert "no earlier checkpoint" in str(error.value)
    assert list(tmp_path.iterdir()) == []
