#!/usr/bin/env python
"""dinodet2: DINOv2 + LoRA DETR-style object detection as a Detectron2 extension.

Detectron2 itself is not on PyPI under its own name, so it is not listed in install_requires:
install it from source (https://github.com/facebookresearch/detectron2) or let
``tools/dev.sh`` install the PyPI build ``sal-detectron2==0.7.2`` (see README.md).
"""
from setuptools import find_packages, setup

setup(
    name="dinodet2",
    version="0.1.0",
    description="DINOv2 + LoRA DETR-style object detection for Detectron2",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["dinodet2", "dinodet2.*"]),
    python_requires=">=3.9",
    # Tested (CI): torch 2.14.1, torchvision 0.29.1, transformers 5.24.0, peft 0.21.2, scipy 1.17.1,
    # numpy 2.4.6, fvcore 0.1.5.post20221221, pycocotools 2.0.11, opencv-python-headless 5.0.
    # Lower bounds are the oldest releases providing the APIs used (e.g. peft's
    # inject_adapter_in_model, transformers' Dinov2WithRegisters); they are not tested here.
    # transformers 4.x module names are resolved by design (MODEL.LORA.TARGET_MODULES families).
    install_requires=[
        "torch>=2.1",
        "torchvision>=0.16",
        "transformers>=4.48",  # Dinov2WithRegisters
        "peft>=0.10",
        "scipy>=1.9",
        "numpy",
        "fvcore>=0.1.5.post20221221",
        "iopath>=0.1.9",
        "pycocotools>=2.0.6",
        "opencv-python-headless>=4.6",
        "Pillow>=9.0",
        # Detectron2's own pure-Python dependencies (installed here because the PyPI wheel is
        # installed without its metadata's dependencies; harmless for a source build).
        "matplotlib",
        "termcolor>=1.1",
        "yacs>=0.1.8",
        "tabulate",
        "cloudpickle",
        "tqdm>4.29.0",
        "tensorboard",
        "omegaconf>=2.1,<2.4",
        "hydra-core>=1.1",
        "black",
        "packaging",
    ],
    # export: tools/export_model.py (ONNX via torch.onnx.export(dynamo=True), which needs onnxscript;
    # ONNX Runtime parity); openvino is optional (--openvino) and not installed by default.
    extras_require={"test": ["pytest>=7", "onnx>=1.16", "onnxscript>=0.3", "onnxruntime>=1.18"],
                    "export": ["onnx>=1.16", "onnxscript>=0.3", "onnxruntime>=1.18"]},
)
