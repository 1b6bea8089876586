"""ONNX export (tools/export_model.py, dinodet2.export): ONNX Runtime matches PyTorch on the exported
single-image graph, training-only parts are absent from it, and the OpenVINO IR computes the same.

Skipped (with the reason) only when ``onnx`` / ``onnxruntime`` / ``onnxscript`` are not installed
(``pip install -e .[test]`` installs them)."""
import numpy as np
import pytest
import torch

from conftest import load_tool, make_improved_tiny_cfg, make_tiny_cfg

for _module in ("onnx", "onnxruntime", "onnxscript"):
    pytest.importorskip(_module, reason=f"ONNX export tests need '{_module}' (pip install -e .[test])")

# not multiples of the tiny model's size_divisibility (28): the graph pads inside
HEIGHT, WIDTH = 50, 78


@pytest.fixture(scope="module")
def improved_export(tmp_path_factory):
    """The improved tiny model (deformable encoder/decoder, two-stage, varifocal) with denoising (a
    training-only label embedding) and LoRA, exported by the tool with ``--dynamic --check`` (parity
    at the export size and at two other sizes)."""
    cfg = make_improved_tiny_cfg({"MODEL.DETR.DN.ENABLED": True})
    path = tmp_path_factory.mktemp("export") / "improved.onnx"
    report = load_tool("export_model").export(cfg, "", str(path), HEIGHT, WIDTH, dynamic=True, check=True)
    return cfg, path, report


def test_dynamic_export_matches_pytorch_at_several_sizes(improved_export):
    _, path, report = improved_export
    assert report["merged_lora_layers"] > 0
    # the export size, one padded by half a divisor (a padding edge on a token edge) and a larger one
    assert [p["size"] for p in report["parity"]] == [[HEIGHT, WIDTH], [70, 98], [79, 135]]
    for parity in report["parity"]:
        assert parity["max_score_diff"] < 1e-4
        assert parity["max_box_diff"] < 1e-3  # input pixels
        assert parity["label_mismatches"] == 0


def test_wrapper_equals_model_inference(improved_export):
    """The exported module's detections are DETR.inference's on the same image (normalisation,
    padding with its mask and the top-k all inside the module); ONNX parity with it is tested above."""
    from detectron2.modeling import build_model

    from dinodet2.export import ExportableDETR

    cfg, _, _ = improved_export
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    for height, width in ((HEIGHT, WIDTH), (70, 98)):
        image = torch.rand(1, 3, height, width) * 255
        with torch.no_grad():
            boxes, scores, labels = ExportableDETR(model)(image)
            inst = model([{"image": image[0]}])[0]["instances"]
        torch.testing.assert_close(scores, inst.scores, rtol=0, atol=1e-6)
        torch.testing.assert_close(boxes, inst.pred_boxes.tensor, rtol=0, atol=1e-4)
        assert torch.equal(labels, inst.pred_classes)


def test_training_only_parts_absent(improved_export):
    """No denoising label embedding, LoRA tensor or training signal in the graph, by name or by
    value; the same check finds an inference weight (class_embed), so it can fail."""
    from detectron2.modeling import build_model

    from dinodet2.export import training_only_names
    from dinodet2.modeling.backbone.lora import merge_lora_

    cfg, path, report = improved_export
    assert report["training_only_names"] == []
    model = build_model(make_improved_tiny_cfg({"MODEL.DETR.DN.ENABLED": True}))  # the exported weights
    assert any("denoising.label_embed" in n for n, _ in model.named_parameters())
    assert any("lora_" in n for n, _ in model.named_parameters())
    merge_lora_(model)
    assert training_only_names(str(path), model) == []
    found = training_only_names(str(path), model, ("class_embed", "input_proj.0.0"))
    assert "value of class_embed.weight" in found and "model.input_proj.0.0.weight" in found


@pytest.fixture(scope="module")
def seed_export(tmp_path_factory):
    """The seed head (softmax classes, learned queries, plain decoder) exported at a fixed size."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("export") / "seed.onnx"
    return path, load_tool("export_model").export(make_tiny_cfg(), "", str(path), HEIGHT, WIDTH, check=True)


def test_seed_model_fixed_size_export(seed_export):
    _, report = seed_export
    (parity,) = report["parity"]
    assert parity["max_score_diff"] < 1e-4 and parity["max_box_diff"] < 1e-3 and parity["label_mismatches"] == 0
    assert report["training_only_names"] == []


def test_openvino_ir_matches_onnx(seed_export):
    openvino = pytest.importorskip("openvino", reason="the optional --openvino export needs 'openvino'")
    from dinodet2.export import convert_to_openvino, onnxruntime_outputs

    path, _ = seed_export
    xml = convert_to_openvino(str(path))
    image = torch.rand(1, 3, HEIGHT, WIDTH) * 255
    # f32: OpenVINO's CPU plugin otherwise runs in bf16 / f16 where the CPU supports it
    compiled = openvino.Core().compile_model(xml, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    result = compiled(image.numpy())
    boxes, scores, _ = onnxruntime_outputs(str(path), image)
    np.testing.assert_allclose(result[compiled.outputs[1]], scores, atol=1e-3)  # measured 1.1e-4
    np.testing.assert_allclose(result[compiled.outputs[0]], boxes, atol=1e-2)  # pixels; measured 5e-3


def test_low_opset_refused(tmp_path):
    from dinodet2.export import export_onnx

    with pytest.raises(ValueError, match="opset >= 16"):
        export_onnx(torch.nn.Identity(), str(tmp_path / "x.onnx"), HEIGHT, WIDTH, opset=15)


@pytest.mark.parametrize("size, level", [((112, 84), (8, 6)), ((112, 84), (4, 3)), ((56, 98), (16, 28)),
                                         ((70, 98), (20, 28)), ((56, 84), (2, 3))])
def test_level_mask_equals_nearest_interpolation(size, level):
    """DETR's integer-arithmetic mask resize (exportable) equals F.interpolate(mode="nearest"), incl.
    the stride-3.5 level (56 -> 16)."""
    from dinodet2.modeling.meta_arch.detr import _nearest_mask

    mask = torch.rand(2, *size, generator=torch.Generator().manual_seed(0)) > 0.5
    expected = torch.nn.functional.interpolate(mask[None].float(), size=level).to(torch.bool)[0]
    assert torch.equal(_nearest_mask(mask, *level), expected)
