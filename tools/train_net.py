#!/usr/bin/env python
"""Train / evaluate a dinodet2 detector with Detectron2's trainer.

Examples::

    python tools/train_net.py --config-file configs/Demo/detr_shapes_tiny.yaml
    python tools/train_net.py --config-file configs/COCO-Detection/detr_dinov2_base_lora4.yaml --num-gpus 8
    python tools/train_net.py --config-file <cfg> --eval-only MODEL.WEIGHTS output/model_final.pth
    python tools/train_net.py --config-file <cfg> --resume          # continue from OUTPUT_DIR/last_checkpoint
"""
import os
import sys

# Allow running from a source checkout without `pip install -e .`.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import detectron2.utils.comm as comm  # noqa: E402
from detectron2.engine import default_argument_parser, default_setup, launch  # noqa: E402
from detectron2.evaluation import verify_results  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402

from dinodet2.config import load_dinodet2_config  # noqa: E402
from dinodet2.engine import Dinodet2Checkpointer, Trainer, prepare_datasets  # noqa: E402
from dinodet2.engine.cpu_allocator import apply_allocator_config  # noqa: E402


def setup(args):
    """Config from defaults + dinodet2 defaults + YAML file + command-line overrides."""
    cfg = load_dinodet2_config(args.config_file, args.opts)
    default_setup(cfg, args)
    setup_logger(output=cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="dinodet2")
    apply_allocator_config(cfg)
    return cfg


def main(args):
    cfg = setup(args)
    if args.eval_only:
        prepare_datasets(cfg.DATASETS.TEST)
        model = Trainer.build_model(cfg)
        Dinodet2Checkpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        res = Trainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, res)
        return res
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def invoke_main() -> None:
    args = default_argument_parser().parse_args()
    print("Command Line Args:", args)
    launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args,))


if __name__ == "__main__":
    invoke_main()
