"""DINOv2 vision transformer (HF ``transformers``) as a Detectron2 ``Backbone``."""
import logging
import os
import pickle
from collections import OrderedDict
from typing import Dict, Sequence

import torch
import torch.nn as nn
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone

from .lora import (
    LoraSpec,
    adalora_orthogonal_loss,
    find_adalora_tuner,
    inject_adalora,
    inject_lora,
    is_lora_parameter,
    layer_index_of,
)
from .windowed_attention import (
    average_window_prefix,
    check_grid_divisible,
    join_windows,
    resolve_window_blocks,
    split_windows,
    to_window_order,
    validate_num_windows,
    window_order_to_maps,
)

logger = logging.getLogger(__name__)

__all__ = ["Dinov2Backbone", "build_dinov2_backbone", "load_dinov2_model"]

_POS_CACHE_SIZE = 16


def init_sincos_position_embeddings(vit: nn.Module) -> None:
    """Give a randomly initialised DINOv2 fixed 2-D sine-cosine position embeddings (as MAE does).

    HF initialises position embeddings with std 0.02, far below the patch embeddings' magnitude,
    so a random model's tokens carry almost no position information; DETR's decoder reads object
    positions from the tokens' content, and would first have to grow them. Pretrained checkpoints
    are not touched.
    """
    table = vit.embeddings.position_embeddings  # [1, 1 + g*g, C]
    dim = table.shape[-1]
    grid = int(round((table.shape[1] - 1) ** 0.5))
    if dim % 4:
        return
    coords = torch.arange(grid, dtype=torch.float32)
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    out_y, out_x = yy.reshape(-1, 1) * omega, xx.reshape(-1, 1) * omega
    pos = torch.cat([out_x.sin(), out_x.cos(), out_y.sin(), out_y.cos()], dim=1)
    with torch.no_grad():
        table[0, 1:] = pos.to(table.dtype)
        table[0, :1] = 0


def load_dinov2_model(name: str, *, random_init: bool = False, size_kwargs: Dict = None,
                      drop_path_rate: float = 0.0, local_files_only: bool = False) -> nn.Module:
    """Load a pretrained DINOv2 (Hub id or local directory) or build a random one.

    Dispatches through ``AutoModel`` so "with registers" checkpoints get their own class. Any
    failure to load (no network, offline mode without a cached copy, a missing / incomplete /
    corrupt directory or cached download) raises an ``OSError`` that says how to fix it: a local
    ``save_pretrained`` copy in ``MODEL.DINOV2.NAME``, ``HF_HUB_OFFLINE`` /
    ``MODEL.DINOV2.LOCAL_FILES_ONLY``, or ``MODEL.DINOV2.RANDOM_INIT``.
    """
    from safetensors import SafetensorError
    from transformers import AutoModel, Dinov2Config, Dinov2WithRegistersConfig

    if random_init:
        size_kwargs = dict(size_kwargs or {})
        num_registers = size_kwargs.pop("num_register_tokens", 0)
        config_cls = Dinov2WithRegistersConfig if num_registers > 0 else Dinov2Config
        extra = {"num_register_tokens": num_registers} if num_registers > 0 else {}
        config = config_cls(drop_path_rate=drop_path_rate, **size_kwargs, **extra)
        model = AutoModel.from_config(config)
        init_sincos_position_embeddings(model)
        return model
    offline = local_files_only or _hub_offline()
    try:
        return AutoModel.from_pretrained(name, drop_path_rate=drop_path_rate, local_files_only=offline)
    # OSError: not found / no connection (transformers' wrapping of the huggingface_hub errors);
    # ValueError: invalid id, unknown model type; SafetensorError / RuntimeError / EOFError /
    # UnpicklingError: a truncated or corrupt weights file (e.g. an interrupted download).
    except (OSError, ValueError, SafetensorError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
        raise OSError(_load_failure_message(name, e, offline)) from e


def _hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` as huggingface_hub reads it (1 / ON / YES / TRUE, any case)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _load_failure_message(name: str, error: Exception, offline: bool) -> str:
    """What went wrong loading ``MODEL.DINOV2.NAME=name`` and how to fix it."""
    cause = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
    random_init = "To train without pretrained weights, set MODEL.DINOV2.RANDOM_INIT True."
    save_copy = ("`python -c \"from transformers import AutoModel; "
                 f"AutoModel.from_pretrained('{name if not _looks_like_path(name) else 'facebook/dinov2-base'}')"
                 ".save_pretrained('/path/to/dinov2')\"`")
    if os.path.isdir(os.path.expanduser(name)):
        return (
            f"Could not load DINOv2 weights from the local directory MODEL.DINOV2.NAME='{name}' ({cause}). It "
            "must hold a complete `save_pretrained` output (config.json and model.safetensors); an incomplete or "
            f"truncated copy gives this error. Write it again, e.g. on a machine with network access: {save_copy}, "
            f"and copy the whole folder. {random_init}"
        )
    if _looks_like_path(name):
        return (
            f"MODEL.DINOV2.NAME='{name}' looks like a local directory, but it does not exist. Point it "
            "at a folder written by `save_pretrained` (config.json + model.safetensors), or use a Hub id such as "
            f"facebook/dinov2-base. {random_init}"
        )
    from huggingface_hub import constants

    where = (f"Offline mode is on (HF_HUB_OFFLINE or MODEL.DINOV2.LOCAL_FILES_ONLY), so only the HuggingFace "
             f"cache '{constants.HF_HUB_CACHE}' was searched." if offline else
             f"The HuggingFace Hub was asked, with the cache '{constants.HF_HUB_CACHE}' as fallback.")
    return (
        f"Could not load DINOv2 weights for the Hub id MODEL.DINOV2.NAME='{name}' ({cause}). {where}\n"
        "Without access to the Hub: download the model once on a machine that has it, e.g. "
        f"{save_copy}, copy the folder here and set MODEL.DINOV2.NAME /path/to/dinov2 (a local directory). "
        "Or copy a HuggingFace cache holding the model (HF_HOME) and set HF_HUB_OFFLINE=1 (or MODEL.DINOV2."
        "LOCAL_FILES_ONLY True) so the Hub is never contacted. A partial or corrupt download in the cache gives this "
        f"error too: delete the model's folder in the cache and download it again. {random_init}"
    )


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or name.count("/") > 1


class Dinov2Backbone(Backbone):
    """DINOv2 token embeddings as stride-14 feature maps from one or several blocks.

    * Works for any input size that is a multiple of the patch size (``size_divisibility``
      makes Detectron2's ``ImageList`` pad to it); position embeddings are interpolated with
      DINOv2's own routine and cached per feature-grid shape.
    * CLS (and register) tokens are dropped from the outputs.
    * Output names are ``layer{i}`` for each 0-based block index ``i`` in ``out_indices``.
    * Blocks in ``window_block_indexes`` (indices of the full model, negative from the end) attend
      inside ``num_windows x num_windows`` windows of the patch grid (:mod:`.windowed_attention`);
      inputs must then be multiples of ``patch_size * num_windows`` (the ``size_divisibility``).
    """

    def __init__(self, vit: nn.Module, out_indices: Sequence[int] = (-1,), apply_layernorm: bool = True,
                 window_block_indexes: Sequence[int] = (), num_windows: int = 1):
        super().__init__()
        depth = len(vit.encoder.layer)
        if not out_indices:
            raise ValueError("MODEL.DINOV2.OUT_INDICES is empty; give at least one block index (e.g. [-1]).")
        indices = sorted({i % depth if -depth <= i < depth else _bad_index(i, depth) for i in out_indices})
        self.num_windows = validate_num_windows(num_windows)
        # Windowed blocks among those that run (the blocks after the last output are dropped below).
        windowed = resolve_window_blocks(window_block_indexes, depth)
        self.window_blocks = {i for i in windowed if i <= indices[-1]}
        if windowed - self.window_blocks:
            logger.warning("MODEL.DINOV2.WINDOW_BLOCK_INDEXES names blocks %s, which are dropped (after the last "
                           "OUT_INDICES block %d); they have no effect.", sorted(windowed - self.window_blocks),
                           indices[-1])
        # Blocks after the last requested one never run: drop them (less memory, no DDP-unused params).
        vit.encoder.layer = vit.encoder.layer[: indices[-1] + 1]
        self.vit = vit
        self.out_indices = indices
        self.apply_layernorm = apply_layernorm
        self.patch_size = _as_int(vit.config.patch_size)
        self.num_register_tokens = getattr(vit.config, "num_register_tokens", 0) or 0
        self.hidden_size = vit.config.hidden_size
        self._out_features = [f"layer{i}" for i in indices]
        self._out_feature_strides = {f: self.patch_size for f in self._out_features}
        self._out_feature_channels = {f: self.hidden_size for f in self._out_features}
        self._pos_cache: "OrderedDict[tuple, torch.Tensor]" = OrderedDict()

    @property
    def size_divisibility(self) -> int:
        """Inputs must be multiples of this: the patch size, times NUM_WINDOWS with windowed blocks."""
        return self.patch_size * (self.num_windows if self.window_blocks else 1)

    @property
    def padding_constraints(self) -> Dict[str, int]:
        return {"size_divisibility": self.size_divisibility}

    def position_embeddings(self, height: int, width: int, dtype: torch.dtype, device) -> torch.Tensor:
        """[1, 1 + h*w, C] position embeddings (CLS first) for an input of ``height`` x ``width`` px.

        Uses DINOv2's ``interpolate_pos_encoding`` so results match the plain model exactly, and
        caches the result per shape while the embeddings are not being trained.
        """
        emb = self.vit.embeddings
        table = emb.position_embeddings
        num_tokens = 1 + (height // self.patch_size) * (width // self.patch_size)
        # Under torch.compile the interpolation is traced into the graph (the key's data_ptr() would break it).
        cacheable = not (torch.is_grad_enabled() and table.requires_grad) and not torch.compiler.is_compiling()
        key = (height, width, dtype, device, table._version, table.data_ptr()) if cacheable else None
        if cacheable and key in self._pos_cache:
            self._pos_cache.move_to_end(key)
            return self._pos_cache[key]
        probe = torch.empty(1, num_tokens, self.hidden_size, dtype=dtype, device=device)
        pos = emb.interpolate_pos_encoding(probe, height, width).to(dtype)
        if cacheable:
            self._pos_cache[key] = pos.detach()
            if len(self._pos_cache) > _POS_CACHE_SIZE:
                self._pos_cache.popitem(last=False)
        return pos

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        return self.features(x, self.out_indices)

    def features(self, x: torch.Tensor, out_indices: Sequence[int]) -> Dict[str, torch.Tensor]:
        """``{"layer{i}": [B, C, h, w]}`` for the (0-based, kept) blocks ``out_indices``; ``forward``
        returns those of ``MODEL.DINOV2.OUT_INDICES``. Blocks after the last index do not run."""
        depth = len(self.vit.encoder.layer)
        if any(not 0 <= i < depth for i in out_indices):
            raise ValueError(f"block indices {list(out_indices)} are outside the {depth} blocks this backbone keeps")
        last = max(out_indices)
        batch, _, height, width = x.shape
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(
                f"DINOv2 input of size {height}x{width} is not a multiple of the patch size {p}; "
                "pad it (Detectron2's ImageList does so with backbone.size_divisibility)."
            )
        h, w = height // p, width // p
        if self.window_blocks:
            check_grid_divisible(height, width, p, self.num_windows)
        emb = self.vit.embeddings
        patches = emb.patch_embeddings(x)
        pos = self.position_embeddings(height, width, patches.dtype, patches.device)
        cls = emb.cls_token.expand(batch, -1, -1) + pos[:, :1]
        tokens = [cls]
        if self.num_register_tokens:
            tokens.append(emb.register_tokens.expand(batch, -1, -1))
        tokens.append(patches + pos[:, 1:])
        hidden = emb.dropout(torch.cat(tokens, dim=1))

        prefix = 1 + self.num_register_tokens
        n = self.num_windows
        # With windowed blocks the patch tokens stay in window order throughout (windowed_attention):
        # windowed blocks run on a view of it ([B * n*n, prefix + window tokens, C]), global blocks on
        # [B, prefix + h*w, C] with one prefix copy (attention is order-independent).
        if self.window_blocks:
            hidden = to_window_order(hidden, prefix, (h, w), n)
        in_windows = False
        outputs = {}
        for i, block in enumerate(self.vit.encoder.layer[:last + 1]):
            windowed = i in self.window_blocks
            if windowed:
                hidden = (average_window_prefix(hidden, prefix, n) if in_windows
                          else split_windows(hidden, prefix, n))
            elif in_windows:
                hidden = join_windows(hidden, prefix, n)
            in_windows = windowed
            hidden = block(hidden)
            if isinstance(hidden, tuple):  # transformers 4.x blocks return tuples
                hidden = hidden[0]
            if i in out_indices:
                out = self.vit.layernorm(hidden) if self.apply_layernorm else hidden
                if self.window_blocks:
                    outputs[f"layer{i}"] = window_order_to_maps(out[:, prefix:], batch, (h, w), n)
                else:
                    out = out[:, prefix:].transpose(1, 2).reshape(batch, self.hidden_size, h, w)
                    outputs[f"layer{i}"] = out.contiguous()
        return outputs

    def extra_losses(self) -> Dict[str, torch.Tensor]:
        """The backbone's own training losses, for the meta-architecture to add to its losses:
        ``{"loss_adalora_orth": ORTH_REG_WEIGHT * regularization}`` when the ViT has AdaLoRA
        adapters and ``MODEL.LORA.ADALORA.ORTH_REG_WEIGHT > 0``, else ``{}``."""
        if "_adalora_tuner" not in self.__dict__:  # looked up once; kept outside the module tree
            self.__dict__["_adalora_tuner"] = find_adalora_tuner(self.vit)
        return adalora_orthogonal_loss(self.__dict__["_adalora_tuner"])

    # Optimizer roles (dinodet2.modeling.param_roles): the ViT's embeddings get no weight decay;
    # its weights train at SOLVER.LORA_LR_MULTIPLIER (adapters) or BACKBONE_LR_MULTIPLIER (unfrozen).
    EMBEDDINGS = ("cls_token", "mask_token", "position_embeddings", "register_tokens")

    def no_weight_decay(self):
        return {name for name, _ in self.named_parameters() if name.rpartition(".")[2] in self.EMBEDDINGS}

    def lr_roles(self):
        return {name: "lora" if is_lora_parameter(name) else "backbone" for name, _ in self.named_parameters()}

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {
            name: ShapeSpec(channels=self._out_feature_channels[name], stride=self._out_feature_strides[name])
            for name in self._out_features
        }


def _bad_index(i: int, depth: int):
    raise ValueError(f"MODEL.DINOV2.OUT_INDICES contains {i}, but the model has {depth} blocks "
                     f"(valid: {-depth}..{depth - 1}).")


def _as_int(v) -> int:
    return int(v[0]) if isinstance(v, (list, tuple)) else int(v)


def configure_trainable(backbone: Dinov2Backbone, freeze: bool, unfreeze_norms: bool = False,
                        unfreeze_last_n_blocks: int = 0) -> None:
    """Which DINOv2 weights train. LoRA parameters always train.

    ``freeze=False`` trains the whole ViT (full fine-tuning). With ``freeze=True`` the pretrained
    weights are frozen except, for partial fine-tuning, every LayerNorm (``unfreeze_norms``) and
    the last ``unfreeze_last_n_blocks`` transformer blocks. Unfrozen weights train at
    ``SOLVER.BACKBONE_LR_MULTIPLIER`` x the base LR. The mask token (used only by DINOv2's
    masked-image pre-training) never receives a gradient here, so it is always frozen; otherwise
    DDP would report it as an unused parameter.
    """
    depth = len(backbone.vit.encoder.layer)
    if not 0 <= unfreeze_last_n_blocks <= depth:
        raise ValueError(f"MODEL.DINOV2.UNFREEZE_LAST_N_BLOCKS={unfreeze_last_n_blocks} must be in 0..{depth} "
                         f"(the backbone keeps {depth} blocks).")
    norm_params = {id(p) for m in backbone.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters()}
    for name, param in backbone.named_parameters():
        if name.endswith("mask_token"):
            param.requires_grad = False
        elif is_lora_parameter(name) or not freeze:
            param.requires_grad = True
        else:
            layer = layer_index_of(name)
            in_last_blocks = layer is not None and layer >= depth - unfreeze_last_n_blocks
            param.requires_grad = in_last_blocks or (unfreeze_norms and id(param) in norm_params)


@BACKBONE_REGISTRY.register()
def build_dinov2_backbone(cfg, input_shape: ShapeSpec = None) -> Dinov2Backbone:
    """DINOv2 (+ LoRA) backbone with single-scale outputs (``MODEL.DINOV2.*``, ``MODEL.LORA.*``).

    Pretrained weights are loaded *before* LoRA adapters are injected, so HF checkpoints keep
    their original parameter names.
    """
    c = cfg.MODEL.DINOV2
    if input_shape is not None and input_shape.channels not in (None, 3):
        raise ValueError(f"DINOv2 expects 3 input channels, got {input_shape.channels}.")
    vit = load_dinov2_model(
        c.NAME,
        random_init=c.RANDOM_INIT,
        size_kwargs=dict(
            hidden_size=c.HIDDEN_SIZE, num_hidden_layers=c.NUM_LAYERS, num_attention_heads=c.NUM_HEADS,
            mlp_ratio=int(c.MLP_RATIO) if float(c.MLP_RATIO).is_integer() else c.MLP_RATIO, patch_size=c.PATCH_SIZE, image_size=c.PRETRAIN_IMAGE_SIZE,
            num_register_tokens=c.NUM_REGISTER_TOKENS,
        ),
        drop_path_rate=c.DROP_PATH_RATE,
        local_files_only=c.LOCAL_FILES_ONLY,
    )
    backbone = Dinov2Backbone(vit, out_indices=c.OUT_INDICES, apply_layernorm=c.APPLY_LAYERNORM,
                              window_block_indexes=c.WINDOW_BLOCK_INDEXES, num_windows=c.NUM_WINDOWS)
    if cfg.MODEL.LORA.ENABLED:
        ada = cfg.MODEL.LORA.ADALORA
        if ada.ENABLED:
            inject_adalora(backbone.vit, LoraSpec.from_config(cfg), init_r=ada.INIT_R, target_r=ada.TARGET_R,
                           total_step=cfg.SOLVER.MAX_ITER, tinit=ada.TINIT, tfinal=ada.TFINAL, delta_t=ada.DELTA_T,
                           beta1=ada.BETA1, beta2=ada.BETA2, orth_reg_weight=ada.ORTH_REG_WEIGHT)
        else:
            inject_lora(backbone.vit, LoraSpec.from_config(cfg))
    configure_trainable(backbone, freeze=c.FREEZE, unfreeze_norms=c.UNFREEZE_NORMS,
                        unfreeze_last_n_blocks=c.UNFREEZE_LAST_N_BLOCKS)
    total = sum(p.numel() for p in backbone.parameters())
    trainable = sum(p.numel() for p in backbone.parameters() if p.requires_grad)
    logger.info("DINOv2 backbone: %s parameters, %s trainable (%.2f%%)", f"{total:,}", f"{trainable:,}",
                100.0 * trainable / max(total, 1))
    return backbone
