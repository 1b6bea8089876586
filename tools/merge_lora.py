#!/usr/bin/env python
"""Merge a model's LoRA adapters into the DINOv2 weights for deployment.

Builds the model of ``--config-file`` (+ overrides), loads ``--weights`` (a full, trainable-only or
plain checkpoint), merges every adapter into its base layer (``W + scale * B @ A``, DoRA included),
checks that the merged model's raw outputs (class logits and boxes of every query) match the adapted model's on a fixed input, times inference
before and after, and writes to ``--output-dir``:

* ``model_merged.pth``: a plain checkpoint (``{"model": state_dict}``) without any LoRA tensors, with
  the class names of ``--weights`` (or of the config's registered training dataset) carried over;
* ``config.yaml``: the same config with ``MODEL.LORA.ENABLED False`` and ``MODEL.WEIGHTS`` set to
  the merged checkpoint, ready for ``tools/train_net.py --eval-only`` or ``DefaultPredictor``;
* ``merge_report.json``: number of merged layers, max abs output difference, timings.

Example::

    python tools/merge_lora.py --config-file output/demo/config.yaml --weights output/demo/model_final.pth \\
        --output-dir output/demo_merged
"""
import argparse
import copy
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402

from dinodet2.config import load_dinodet2_config  # noqa: E402
from dinodet2.engine import Dinodet2Checkpointer  # noqa: E402
from dinodet2.engine.checkpoint import CLASS_NAMES, class_names_of, training_class_names  # noqa: E402
from dinodet2.engine.atomic_file import write_atomically  # noqa: E402
from dinodet2.modeling.backbone.lora import merge_lora_  # noqa: E402


def fixed_inputs(cfg, size, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"image": torch.rand(3, size, int(size * 1.25), generator=g) * 255} for _ in range(2)]


@torch.no_grad()
def outputs_and_time(model, inputs, iters):
    """Raw predictions (logits, boxes of every query) on ``inputs`` and median inference time."""
    model.eval()
    images, mask = model.preprocess_image(inputs)
    out = model.forward_transformer(images, mask)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        model(inputs)
        times.append(time.perf_counter() - start)
    return out["pred_logits"], out["pred_boxes"], statistics.median(times) if times else float("nan")


def merge(cfg, weights, output_dir, image_size=224, iters=5):
    if not cfg.MODEL.LORA.ENABLED:
        raise SystemExit("MODEL.LORA.ENABLED is False in this config: there is nothing to merge.")
    model = build_model(cfg)
    Dinodet2Checkpointer(model).load(weights)
    inputs = fixed_inputs(cfg, image_size)
    logits, boxes, t_lora = outputs_and_time(model, inputs, iters)
    merged = merge_lora_(model)
    m_logits, m_boxes, t_merged = outputs_and_time(model, inputs, iters)
    diff = max((logits - m_logits).abs().max().item(), (boxes - m_boxes).abs().max().item())

    os.makedirs(output_dir, exist_ok=True)
    weights_out = os.path.join(output_dir, "model_merged.pth")
    # training-only parts (e.g. the token-alignment projector) are left out of the merged model
    state = model.inference_state_dict() if hasattr(model, "inference_state_dict") else model.state_dict()
    checkpoint = {"model": state}
    class_names = class_names_of(weights) or training_class_names(cfg)  # carried over for tools/demo.py
    if class_names:
        checkpoint[CLASS_NAMES] = class_names
    write_atomically(weights_out, lambda f: torch.save(checkpoint, f))  # never a half-written file
    merged_cfg = copy.deepcopy(cfg)
    merged_cfg.defrost()
    merged_cfg.MODEL.LORA.ENABLED = False
    merged_cfg.MODEL.TOKEN_ALIGNMENT.ENABLED = False
    merged_cfg.MODEL.DISTILL.ENABLED = False
    merged_cfg.MODEL.WEIGHTS = os.path.abspath(weights_out)
    with open(os.path.join(output_dir, "config.yaml"), "w") as f:
        f.write(merged_cfg.dump())
    report = {"merged_layers": merged, "max_abs_output_diff": diff, "inference_s_lora": t_lora,
              "inference_s_merged": t_merged, "image_size": [image_size, int(image_size * 1.25)],
              "batch_size": len(inputs), "weights": os.path.abspath(weights_out)}
    with open(os.path.join(output_dir, "merge_report.json"), "w") as f:
        json.dump(report, f, indent=2)
    return report


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--weights", required=True, help="checkpoint to merge (full or trainable-only)")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--image-size", type=int, default=224, help="short side of the check/timing images")
    parser.add_argument("--iters", type=int, default=5, help="timed inference iterations before / after")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    args = parser.parse_args(argv)
    report = merge(load_dinodet2_config(args.config_file, args.opts), args.weights, args.output_dir, args.image_size, args.iters)
    print(f"merged {report['merged_layers']} LoRA layers; max |output difference| = "
          f"{report['max_abs_output_diff']:.3g}; inference {report['inference_s_lora']:.4f} s -> "
          f"{report['inference_s_merged']:.4f} s per batch of {report['batch_size']}")
    print(f"wrote {report['weights']} and config.yaml, merge_report.json in {args.output_dir}")
    return report


if __name__ == "__main__":
    main()
