"""Read a weights / checkpoint file without ever executing code from it.

``pickle`` runs whatever a file tells it to, so a ``MODEL.WEIGHTS`` file is read like this:

* ``.pkl`` (Detectron2 / Caffe2 model zoo): a ``pickle.Unpickler`` that resolves only the globals
  needed to rebuild numpy arrays, dtypes and scalars, ``collections.OrderedDict`` and a few plain
  builtins (:data:`ALLOWED_PICKLE_GLOBALS`); anything else is refused before it is created.
  ``encoding="latin1"`` keeps Python 2 pickles (Detectron1 / Caffe2) readable.
* everything else (``.pth``, pycls ``.pyth``): ``torch.load(weights_only=True)``, passed
  explicitly so that ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` cannot switch it off.

The results follow ``DetectionCheckpointer._load_file``'s conventions (model-zoo ``.pkl`` as is,
Caffe2 blobs without ``*_momentum`` and marked for Detectron2's name matching, pycls
``model_state``). Every file that cannot be read raises :class:`WeightsFileError`, which names the
file, says what was found in it and how to fix it.
"""
import builtins
import codecs
import collections
import logging
import os
import pickle
import re
from typing import Any, Dict

import numpy as np
import torch

__all__ = ["ALLOWED_PICKLE_GLOBALS", "WeightsFileError", "read_checkpoint_file", "read_pickle_file",
           "read_torch_file", "require_weights_file"]

logger = logging.getLogger(__name__)


class WeightsFileError(OSError):
    """A weights / checkpoint file is missing, incomplete, not a checkpoint, or would need to run
    code to load. The message names the file, what is wrong and what to do."""


try:  # numpy >= 2 moved numpy.core to numpy._core; pickles name either (numpy.core is a shim)
    from numpy._core import multiarray as _multiarray, numeric as _numeric
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core import multiarray as _multiarray, numeric as _numeric


def _both_numpy_core_names(submodule: str, name: str, obj) -> Dict:
    return {(f"numpy.core.{submodule}", name): obj, (f"numpy._core.{submodule}", name): obj}


# (module, name) a pickle may ask for -> the object handed out. Nothing here can run code or
# import modules: numpy's array / dtype / scalar reconstruction, an ordered dict, latin1 bytes
# (``_codecs.encode``, how Python 3 pickles bytes at protocol 2) and plain builtin containers
# (Python 2 pickles call the module ``__builtin__``).
ALLOWED_PICKLE_GLOBALS: Dict = {
    **_both_numpy_core_names("multiarray", "_reconstruct", _multiarray._reconstruct),
    **_both_numpy_core_names("multiarray", "scalar", _multiarray.scalar),
    **_both_numpy_core_names("numeric", "_frombuffer", _numeric._frombuffer),
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("_codecs", "encode"): codecs.encode,
    **{(module, name): getattr(builtins, name)
       for module in ("builtins", "__builtin__") for name in ("set", "frozenset", "bytearray")},
}

_CONVERT_HINT = (
    "If you trust the file, convert it once in a trusted environment: load it there (pickle.load / "
    "torch.load(weights_only=False)) and re-save the weights as a plain dict of tensors, e.g. "
    "torch.save({'model': {name: torch.as_tensor(value) for name, value in state_dict.items()}}, 'weights.pth')."
)


class _RefusedGlobal(pickle.UnpicklingError):
    def __init__(self, module: str, name: str):
        super().__init__(f"{module}.{name}")
        self.qualified_name = f"{module}.{name}"


class _WeightsUnpickler(pickle.Unpickler):
    """An unpickler that creates only the objects of :data:`ALLOWED_PICKLE_GLOBALS`."""

    def find_class(self, module: str, name: str):
        try:
            return ALLOWED_PICKLE_GLOBALS[(module, name)]
        except KeyError:
            raise _RefusedGlobal(module, name) from None


def _describe_contents(path: str) -> str:
    """What the file looks like, for error messages ("an empty file", "a text file starting ...")."""
    size = os.path.getsize(path)
    if size == 0:
        return "an empty file (0 bytes)"
    with open(path, "rb") as f:
        head = f.read(64)
    if head.startswith(b"PK\x03\x04"):
        return f"a zip archive of {size} bytes (PyTorch's checkpoint format)"
    if head[:1] == b"\x80":
        return f"a pickle stream of {size} bytes"
    try:
        text = codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError:
        text = None
    if text and all(ch.isprintable() or ch in "\t\r\n" for ch in text):
        return f"a text file of {size} bytes starting with {text[:48]!r}"
    return f"{size} bytes of unrecognised binary data starting with {head[:8]!r}"


def _remedy(description: str) -> str:
    if description.startswith("an empty file") or description.startswith("a zip archive"):
        return ("The file is incomplete (an interrupted write, copy or download): copy or download it again; "
                "for a training run, --resume falls back to the newest readable model_*.pth of OUTPUT_DIR.")
    if description.startswith("a text file"):
        lfs = " It is a Git LFS pointer: fetch the real file with `git lfs pull`." if "git-lfs" in description else ""
        return ("A weights file is binary: a .pth written by torch.save (a dict of tensors, or a checkpoint with a "
                "'model' dict) or a Detectron2 / Caffe2 model-zoo .pkl. A text file in its place is usually a "
                f"Git LFS pointer or an error page saved instead of the download.{lfs}")
    return ("Expected a .pth written by torch.save (a dict of tensors, or a checkpoint with a 'model' dict) or a "
            "Detectron2 / Caffe2 model-zoo .pkl. " + _CONVERT_HINT)


def _short_reason(error: BaseException) -> str:
    """The informative part of a reader's error (torch's are paragraphs of advice)."""
    text = str(error).strip()
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1].strip()
    text = text.splitlines()[0] if text else ""
    text = text.split(". ", 1)[0]
    return f"{type(error).__name__}: {text[:200]}" if text else type(error).__name__


def _unreadable(path: str, error: BaseException) -> WeightsFileError:
    description = _describe_contents(path)
    return WeightsFileError(f"Cannot read weights file '{path}': it is {description} ({_short_reason(error)}). "
                            f"{_remedy(description)}")


def _refused(path: str, global_name: str, reader: str) -> WeightsFileError:
    return WeightsFileError(
        f"Refused to load weights file '{path}': unpickling it needs the Python global '{global_name}', and "
        f"{reader} because unpickling anything else can run arbitrary code. {_CONVERT_HINT}")


def _require_dict(path: str, data: Any) -> Any:
    if not isinstance(data, dict):
        raise WeightsFileError(
            f"Weights file '{path}' holds a {type(data).__name__}, not a dict. Expected a state dict "
            "({name: tensor}) or a checkpoint dict with a 'model' state dict; re-save it as "
            "torch.save({'model': model.state_dict()}, path).")
    return data


def require_weights_file(path: str) -> None:
    """Raise :class:`WeightsFileError` unless ``path`` is an existing file."""
    if not os.path.isfile(path):
        where = "" if os.path.isabs(path) else f" (relative to the current directory {os.getcwd()})"
        raise WeightsFileError(
            f"Weights file '{path}' does not exist{where}. Check MODEL.WEIGHTS / the path you passed; an "
            "empty MODEL.WEIGHTS ('') starts from the pretrained backbone without loading a checkpoint.")


def read_pickle_file(path: str) -> dict:
    """A ``.pkl`` of numpy arrays / plain containers (Python 2 pickles included), read without
    creating any object outside :data:`ALLOWED_PICKLE_GLOBALS`."""
    require_weights_file(path)
    with open(path, "rb") as f:
        try:
            data = _WeightsUnpickler(f, encoding="latin1").load()
        except _RefusedGlobal as e:
            raise _refused(path, e.qualified_name,
                           "a .pkl is only read for numpy arrays and plain containers,") from None
        except Exception as e:  # truncated, empty, text, corrupt: say what the file is instead
            raise _unreadable(path, e) from e
    return _require_dict(path, data)


_TORCH_REFUSED_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


def read_torch_file(path: str) -> dict:
    """``torch.load(path, map_location="cpu", weights_only=True)`` with one clear error for every
    file it cannot read."""
    require_weights_file(path)
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        refused = _TORCH_REFUSED_GLOBAL.search(str(e))
        if refused:
            raise _refused(path, refused.group(1),
                           "torch.load(weights_only=True) only rebuilds tensors and plain containers,") from None
        raise _unreadable(path, e) from e
    return _require_dict(path, data)


def _checkpoint_from_model_zoo_pickle(path: str) -> dict:
    data = read_pickle_file(path)
    if "model" in data and "__author__" in data:  # Detectron2 model zoo: already a checkpoint
        logger.info("Reading a file from '%s'", data["__author__"])
        return data
    # Caffe2 / Detectron1 model zoo: detection models keep their weights under "blobs"; the
    # optimizer's momentum blobs are no weights. Names are matched by Detectron2's heuristics.
    blobs = data.get("blobs", data)
    weights = {name: value for name, value in blobs.items() if not name.endswith("_momentum")}
    return {"model": weights, "__author__": "Caffe2", "matching_heuristics": True}


def _checkpoint_from_pycls(path: str) -> dict:
    data = read_torch_file(path)
    if "model_state" not in data:
        raise WeightsFileError(f"Cannot load .pyth file '{path}': pycls checkpoints hold their weights under "
                               f"'model_state', this one has keys {sorted(map(str, data))[:10]}.")
    state = {k: v for k, v in data["model_state"].items() if not k.endswith("num_batches_tracked")}
    return {"model": state, "__author__": "pycls", "matching_heuristics": True}


def read_checkpoint_file(path: str) -> dict:
    """The contents of a weights file, as ``DetectionCheckpointer._load_file`` interprets it:
    ``.pkl`` -> a Detectron2 checkpoint dict (model zoo as is, Caffe2 blobs converted),
    ``.pyth`` -> pycls' ``model_state`` as a checkpoint dict, anything else -> what ``torch.save``
    wrote (a checkpoint dict or a bare state dict)."""
    if path.endswith(".pkl"):
        return _checkpoint_from_model_zoo_pickle(path)
    if path.endswith(".pyth"):
        return _checkpoint_from_pycls(path)
    return read_torch_file(path)
