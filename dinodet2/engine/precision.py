"""Mixed precision of the training step (``SOLVER.AMP.ENABLED`` / ``SOLVER.AMP.PRECISION``).

Autocast runs the forward's matrix products and convolutions in a 16-bit float type; the weights,
their gradients and the optimizer state stay fp32. Two precisions:

* ``"float16"`` (default, Detectron2's ``AMPTrainer``): CUDA only. fp16 has a narrow exponent range,
  so small gradients underflow without loss scaling: a ``GradScaler`` scales the loss and unscales
  the gradients before the (clipping) optimizer step, and skips steps whose scaled gradients
  overflowed.
* ``"bfloat16"``: CUDA (if the GPU supports it) or CPU (``torch.autocast("cpu", dtype=bfloat16)``).
  bf16 has fp32's exponent range: no ``GradScaler``.

Whatever the precision, deformable sampling
(:mod:`dinodet2.modeling.transformer.deformable_attention`), the Hungarian matching and the losses
(:class:`~dinodet2.modeling.criterion.SetCriterion`) run in fp32 with autocast disabled.
"""
from dataclasses import dataclass
from typing import Optional

import torch

__all__ = ["PRECISIONS", "MixedPrecision", "check_amp_available"]

#: ``SOLVER.AMP.PRECISION`` values and the autocast dtype each names.
PRECISIONS = {"float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class MixedPrecision:
    """Autocast to ``dtype`` on ``device_type`` ("cuda" or "cpu") in the training forward."""

    device_type: str
    dtype: torch.dtype

    @classmethod
    def from_config(cls, cfg) -> Optional["MixedPrecision"]:
        """The precision ``SOLVER.AMP`` asks for on ``MODEL.DEVICE``, or None without AMP. Raises a
        ``ValueError`` naming the keys to change when this device cannot run it."""
        amp = cfg.SOLVER.AMP
        if not amp.ENABLED:
            return None
        name = amp.get("PRECISION", "float16")  # a plain Detectron2 config has no PRECISION key
        if name not in PRECISIONS:
            raise ValueError(f"SOLVER.AMP.PRECISION must be one of {sorted(PRECISIONS)}, got '{name}'.")
        dtype = PRECISIONS[name]
        device_type = torch.device(cfg.MODEL.DEVICE).type
        if device_type == "cuda":
            if not torch.cuda.is_available():
                raise ValueError(
                    f"SOLVER.AMP.ENABLED=True on MODEL.DEVICE='{cfg.MODEL.DEVICE}', but torch.cuda.is_available() "
                    "is False. Without CUDA: set MODEL.DEVICE cpu and SOLVER.AMP.PRECISION bfloat16, or "
                    "SOLVER.AMP.ENABLED False (fp32).")
            if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
                raise ValueError("SOLVER.AMP.PRECISION='bfloat16', but this GPU does not support bfloat16: set "
                                 "SOLVER.AMP.PRECISION float16.")
        elif device_type == "cpu":
            if dtype == torch.float16:
                raise ValueError(
                    f"SOLVER.AMP.ENABLED=True with SOLVER.AMP.PRECISION='float16' needs a CUDA device "
                    f"(MODEL.DEVICE='{cfg.MODEL.DEVICE}', torch.cuda.is_available()={torch.cuda.is_available()}): "
                    "fp16 training relies on CUDA's GradScaler. On the CPU set SOLVER.AMP.PRECISION bfloat16 "
                    "(CPU autocast), or SOLVER.AMP.ENABLED False to train in fp32.")
        else:
            raise ValueError(f"SOLVER.AMP.ENABLED=True is supported on CUDA and CPU devices, not on "
                             f"MODEL.DEVICE='{cfg.MODEL.DEVICE}'; set SOLVER.AMP.ENABLED False.")
        return cls(device_type, dtype)

    @property
    def name(self) -> str:
        """The ``SOLVER.AMP.PRECISION`` value."""
        return next(name for name, dtype in PRECISIONS.items() if dtype == self.dtype)

    @property
    def needs_grad_scaler(self) -> bool:
        """fp16 gradients need loss scaling; bf16 ones do not."""
        return self.dtype == torch.float16

    def autocast(self) -> torch.autocast:
        """The autocast context of the training forward."""
        return torch.autocast(self.device_type, dtype=self.dtype)

    def grad_scaler(self) -> Optional["torch.amp.GradScaler"]:
        """A fresh ``GradScaler`` for fp16, None for bf16."""
        return torch.amp.GradScaler(self.device_type) if self.needs_grad_scaler else None


def check_amp_available(cfg) -> None:
    """Raise a clear ``ValueError`` (instead of Detectron2's bare assertion in the first step) when
    ``SOLVER.AMP`` cannot run on ``MODEL.DEVICE``: see :meth:`MixedPrecision.from_config`."""
    MixedPrecision.from_config(cfg)
