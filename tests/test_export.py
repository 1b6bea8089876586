"""ONNX export (tools/export_model.py, dinodet2.export): ONNX Runtime matches PyTorch on the exported
single-image graph, training-only parts are absent from it, and the OpenVINO IR computes the same.

Skipped (with the reason) only when ``onnx`` / ``onnxruntime`` / ``onnxscript`` are not installed
(``pip install -e .[test]`` installs them)."""
import json

import numpy as np
import pytest
import torch

from conftest import load_tool, make_improved_tiny_cfg, make_tiny_cfg, write_images

for _module in ("onnx", "onnxruntime", "onnxscript"):
    pytest.importorskip(_module, reason=f"ONNX export tests need '{_module}' (pip install -e .[test])")

# not multiples of the tiny model's size_divisibility (28): the graph pads inside
HEIGHT, WIDTH = 50, 78


@pytest.fixture(scope="module")
def improved_export(tmp_path_factory):
    """The improved tiny model (deformable encoder/decoder, two-stage, varifocal) with denoising (a
    training-only label embedding) and LoRA, exported by the tool with ``--dynamic --check --quantize
    int8`` (parity at the export size and at two other sizes, of the fp32 and of the INT8 graph)."""
    cfg = make_improved_tiny_cfg({"MODEL.DETR.DN.ENABLED": True})
    path = tmp_path_factory.mktemp("export") / "improved.onnx"
    report = load_tool("export_model").export(cfg, "", str(path), HEIGHT, WIDTH, dynamic=True, check=True,
                                              quantize="int8")
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


# ------------------------------------------------------------------------------------------------
# the exported model used like the PyTorch one: tools/demo.py and COCO AP through ONNX Runtime
# ------------------------------------------------------------------------------------------------
# original sizes of three aspect ratios; with the test resize below (56..112) they become 56 x 78,
# 84 x 56 and 56 x 56: only the dynamic export takes them all
IMAGE_SIZES = {"a.png": (70, 98), "b.jpg": (96, 64), "c.png": (80, 80)}


@pytest.fixture(scope="module")
def improved_checkpoint(improved_export, tmp_path_factory):
    """The PyTorch model the improved export was made from (same seed and config) as a checkpoint
    and the config.yaml the tools read (test resize 56..112 px, no loader workers), and the model."""
    from detectron2.modeling import build_model

    from dinodet2.engine import Dinodet2Checkpointer

    cfg, _, _ = improved_export
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    folder = tmp_path_factory.mktemp("improved_checkpoint")
    cfg = cfg.clone()
    cfg.merge_from_list(["INPUT.MIN_SIZE_TEST", 56, "INPUT.MAX_SIZE_TEST", 112, "DATALOADER.NUM_WORKERS", 0,
                         "OUTPUT_DIR", str(folder)])
    Dinodet2Checkpointer(model, str(folder), cfg=cfg).save("model_final")
    cfg.MODEL.WEIGHTS = str(folder / "model_final.pth")
    (folder / "config.yaml").write_text(cfg.dump())
    return folder, model


def test_demo_on_the_exported_model_equals_the_pytorch_demo(improved_export, improved_checkpoint, tmp_path):
    """tools/demo.py with MODEL.WEIGHTS model.onnx (ONNX Runtime) writes the same JSON as with the
    checkpoint: same detections in original pixels (images resized by 0.8 and 0.875), same names."""
    from detectron2.data import MetadataCatalog

    from dinodet2.config import load_dinodet2_config
    from dinodet2.engine import build_predictor
    from dinodet2.export import OnnxPredictor, onnx_class_names

    _, onnx_path, report = improved_export
    folder, _ = improved_checkpoint
    images = write_images(tmp_path / "images", IMAGE_SIZES)
    demo = load_tool("demo")

    def run(weights, output):
        json_path = demo.main(["--config-file", str(folder / "config.yaml"), "--input", str(images), "--output",
                               str(tmp_path / output), "--confidence-threshold", "0", "--opts", "MODEL.WEIGHTS", weights])
        return json.loads(open(json_path).read())

    expected = run(str(folder / "model_final.pth"), "pytorch")
    exported = run(str(onnx_path), "onnx")
    assert isinstance(build_predictor(load_dinodet2_config(str(folder / "config.yaml"),
                                                           ["MODEL.WEIGHTS", str(onnx_path)])), OnnxPredictor)
    # the class names travel in the ONNX metadata (the training dataset's, stored at export)
    assert report["class_names"] == onnx_class_names(str(onnx_path)) == MetadataCatalog.get("shapes_train").thing_classes
    assert len(exported) == len(expected) > 0
    assert {r["file_name"] for r in exported} == {str(images / n) for n in IMAGE_SIZES}
    for mine, theirs in zip(exported, expected):
        assert mine.keys() == theirs.keys()
        for key in ("file_name", "image_id", "category_id", "category_name"):
            assert mine[key] == theirs[key]
        assert mine["score"] == pytest.approx(theirs["score"], abs=1e-4)
        assert mine["bbox"] == pytest.approx(theirs["bbox"], abs=1e-3)  # original pixels


def test_coco_ap_through_onnxruntime_equals_pytorch(improved_export, improved_checkpoint, tmp_path):
    """tools/export_model.py --evaluate: COCOEvaluator AP of the ONNX model equals PyTorch's. The
    ground truth is PyTorch's two best detections per image, so PyTorch's AP is high and an ONNX
    path that mis-scaled boxes to the original size would lose most of it."""
    import cv2
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.structures import BoxMode

    from dinodet2.config import load_dinodet2_config
    from dinodet2.engine import build_predictor
    from dinodet2.export import int8_path

    _, onnx_path, _ = improved_export
    folder, model = improved_checkpoint
    cfg = load_dinodet2_config(str(folder / "config.yaml"))
    predictor = build_predictor(cfg)
    images = write_images(tmp_path / "images", IMAGE_SIZES)
    dicts = []
    for image_id, (name, (h, w)) in enumerate(IMAGE_SIZES.items()):
        best = predictor(cv2.imread(str(images / name)))["instances"][:2]
        dicts.append({"file_name": str(images / name), "image_id": image_id, "height": h, "width": w,
                      "annotations": [{"bbox": box, "bbox_mode": BoxMode.XYXY_ABS, "category_id": c, "iscrowd": 0}
                                      for box, c in zip(best.pred_boxes.tensor.tolist(), best.pred_classes.tolist())]})
    dataset = "export_test_pytorch_detections"
    DatasetCatalog.register(dataset, lambda: dicts)
    MetadataCatalog.get(dataset).set(thing_classes=["a", "b", "c"])
    try:
        results = load_tool("export_model").coco_ap_pytorch_and_onnx(cfg, model, str(onnx_path), dataset,
                                                                      str(tmp_path / "evaluation"),
                                                                      str(int8_path(str(onnx_path))))
    finally:
        DatasetCatalog.remove(dataset)
        MetadataCatalog.remove(dataset)
    assert results["pytorch"]["AP"] > 30
    for key in ("AP", "AP50", "AP75"):
        assert results["onnxruntime"][key] == pytest.approx(results["pytorch"][key], abs=0.1)
        assert results["onnxruntime_int8"][key] == pytest.approx(results["pytorch"][key], abs=INT8_AP_TOLERANCE)
    assert (tmp_path / "evaluation" / "onnxruntime" / "coco_instances_results.json").is_file()
    assert (tmp_path / "evaluation" / "onnxruntime_int8" / "coco_instances_results.json").is_file()


def test_fixed_size_export_takes_only_its_size(seed_export):
    """The predictor rescales the graph's boxes to the original image (here x2) and refuses an image
    that ResizeShortestEdge brings to another size than the fixed graph's, naming the fix."""
    from dinodet2.export import OnnxDetector, OnnxPredictor, onnxruntime_outputs

    path, _ = seed_export
    cfg = make_tiny_cfg()
    cfg.merge_from_list(["INPUT.MIN_SIZE_TEST", HEIGHT, "INPUT.MAX_SIZE_TEST", WIDTH])
    predictor = OnnxPredictor(cfg, str(path))
    assert predictor.model.fixed_size == (HEIGHT, WIDTH)
    image_bgr = np.zeros((2 * HEIGHT, 2 * WIDTH, 3), np.uint8)  # resized to exactly HEIGHT x WIDTH (zeros)
    instances = predictor(image_bgr)["instances"]
    boxes, scores, labels = onnxruntime_outputs(str(path), torch.zeros(1, 3, HEIGHT, WIDTH))
    assert instances.image_size == (2 * HEIGHT, 2 * WIDTH) and len(instances) == len(scores)  # none empty
    clipped = np.clip(boxes * 2, 0, [2 * WIDTH, 2 * HEIGHT] * 2)
    np.testing.assert_allclose(instances.pred_boxes.tensor.numpy(), clipped, atol=1e-4)
    np.testing.assert_array_equal(instances.scores.numpy(), scores)
    np.testing.assert_array_equal(instances.pred_classes.numpy(), labels)
    with pytest.raises(ValueError, match=f"fixed input of {HEIGHT} x {WIDTH} .* 56 x 78 .*--dynamic"):
        OnnxDetector(str(path)).detect(torch.zeros(3, 56, 78))
    with pytest.raises(FileNotFoundError, match="MODEL.WEIGHTS.*tools/export_model.py"):
        OnnxDetector(str(path.with_name("missing.onnx")))


# ------------------------------------------------------------------------------------------------
# --quantize int8: ONNX Runtime dynamic quantisation of the ViT's linear layers
# ------------------------------------------------------------------------------------------------
#: the tiny model's ViT: 2 blocks x (query, key, value, output, 2 MLP) linear layers
VIT_LINEARS = 2 * 6
#: relative error of the last quantised ViT layer's output, INT8 vs fp32 graph (measured 0.014)
INT8_FEATURE_ERROR = 0.05
#: COCO AP points the INT8 graph may lose against PyTorch on the tiny model's own detections
INT8_AP_TOLERANCE = 1.0


def _vit_matmul_weights(path):
    """Names of the constant weights of the fp32 graph's MatMuls inside the ViT."""
    import onnx

    from dinodet2.export.quantization import QUANTIZE_SCOPES, _nodes_in_modules

    graph = onnx.load(str(path)).graph
    inits = {i.name for i in graph.initializer}
    nodes = _nodes_in_modules(graph, "MatMul", QUANTIZE_SCOPES["backbone"])
    return {n.input[1] for n in nodes if n.input[1] in inits}


def test_int8_export_quantizes_exactly_the_vit_linears(improved_export):
    """--quantize int8 writes <stem>.int8.onnx with every ViT linear layer as an int8-weight
    MatMulInteger, no fp32 copy of those weights left, the decoder's MatMuls in fp32, the class names kept."""
    import onnx

    from dinodet2.export import int8_path, onnx_class_names

    _, path, report = improved_export
    q = report["int8"]
    assert q["path"] == str(int8_path(str(path))) and q["path"].endswith("improved.int8.onnx")
    assert q["quantized_matmuls"] == q["int8_weights"] == VIT_LINEARS
    assert q["fp32_matmuls"] > 0  # attention scores, decoder and heads stay fp32 with the "backbone" scope
    fp32_weights = _vit_matmul_weights(path)
    assert len(fp32_weights) == VIT_LINEARS
    int8_graph = onnx.load(q["path"]).graph
    left = {i.name for i in int8_graph.initializer if i.data_type == onnx.TensorProto.FLOAT}
    assert not fp32_weights & left
    assert {n.op_type for n in int8_graph.node} >= {"DynamicQuantizeLinear", "MatMulInteger", "GridSample", "TopK"}
    assert onnx_class_names(q["path"]) == onnx_class_names(str(path)) == report["class_names"] is not None


def test_int8_close_to_pytorch(improved_export):
    """The INT8 graph at the export size and two other (dynamic) sizes: the same top classes, scores
    within 1e-3 (measured 3e-5) and boxes within 1 px of PyTorch's; its ViT output within 5 % of the
    fp32 graph's and not equal to it (it is quantised)."""
    _, _, report = improved_export
    assert [p["size"] for p in report["int8_parity"]] == [[HEIGHT, WIDTH], [70, 98], [79, 135]]
    for parity in report["int8_parity"]:
        assert parity["max_score_diff"] < 1e-3
        assert parity["max_box_diff"] < 1.0
        assert parity["top_label_agreement"] == 1.0
    assert 1e-4 < report["int8_feature_error"] < INT8_FEATURE_ERROR


def test_feature_error_catches_a_broken_quantisation(improved_export, tmp_path):
    """The feature bound fails when one weight scale of the ViT's last quantised layer is off by 1.5x."""
    import onnx
    from onnx import numpy_helper

    from dinodet2.export import feature_error

    _, path, report = improved_export
    model = onnx.load(report["int8"]["path"])
    last = [n for n in model.graph.node if n.op_type == "MatMulInteger"][-1]
    (scale,) = [i for i in model.graph.initializer if i.name == last.input[1].replace("_quantized", "_scale")]
    scale.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scale) * 1.5, scale.name))
    broken = tmp_path / "broken.int8.onnx"
    onnx.save(model, str(broken))
    image = torch.rand(1, 3, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(0)) * 255
    assert feature_error(str(path), report["int8"]["path"], image) < INT8_FEATURE_ERROR
    assert feature_error(str(path), str(broken), image) > INT8_FEATURE_ERROR


def test_int8_model_runs_in_the_predictor(improved_export, improved_checkpoint):
    """MODEL.WEIGHTS model.int8.onnx: build_predictor serves the INT8 graph, at two image sizes."""
    from dinodet2.config import load_dinodet2_config
    from dinodet2.engine import build_predictor
    from dinodet2.export import OnnxPredictor

    _, _, report = improved_export
    folder, _ = improved_checkpoint
    cfg = load_dinodet2_config(str(folder / "config.yaml"), ["MODEL.WEIGHTS", report["int8"]["path"]])
    predictor = build_predictor(cfg)
    assert isinstance(predictor, OnnxPredictor) and predictor.model.fixed_size is None
    for height, width in ((70, 98), (96, 64)):
        instances = predictor(np.zeros((height, width, 3), np.uint8))["instances"]
        assert instances.image_size == (height, width) and len(instances) > 0


def test_quantize_scope_all_and_refusals(seed_export, tmp_path):
    """scope "all" also quantises the decoder's linear layers; an unknown scope, and a graph without
    the exporter's module names, are refused with the fix named."""
    import onnx

    from dinodet2.export import quantize_int8

    path, _ = seed_export
    vit = quantize_int8(str(path), str(tmp_path / "vit.int8.onnx"))
    everything = quantize_int8(str(path), str(tmp_path / "all.int8.onnx"), scope="all")
    assert everything["quantized_matmuls"] > vit["quantized_matmuls"] == VIT_LINEARS
    with pytest.raises(ValueError, match="--quantize-scope 'decoder'.*backbone, all"):
        quantize_int8(str(path), scope="decoder")
    model = onnx.load(str(path))
    for node in model.graph.node:
        del node.metadata_props[:]
    onnx.save(model, str(tmp_path / "anonymous.onnx"))
    with pytest.raises(ValueError, match="no MatMul node .*model.backbone.*--quantize-scope all"):
        quantize_int8(str(tmp_path / "anonymous.onnx"))


def test_parity_does_not_count_a_rank_swap_as_a_box_error(monkeypatch):
    """Two near-equal scores swapped by the other runtime: no box error; a moved box: its distance;
    a class missing on the ONNX side: inf."""

    from dinodet2.export import onnx_export

    boxes = np.array([[0.0, 0.0, 10.0, 10.0], [50.0, 50.0, 60.0, 70.0], [5.0, 5.0, 8.0, 9.0]], dtype=np.float32)
    scores = np.array([0.500001, 0.5, 0.1], dtype=np.float32)
    labels = np.array([2, 2, 1])
    swapped = (boxes[[1, 0, 2]], scores[[1, 0, 2]], labels)
    monkeypatch.setattr(onnx_export, "pytorch_and_onnxruntime_outputs",
                        lambda wrapper, path, images: [((boxes, scores, labels), swapped)])
    parity = onnx_export.onnx_parity(None, "unused.onnx", [None])
    assert parity["max_box_diff"] == 0.0 and parity["label_mismatches"] == 0
    assert parity["max_score_diff"] == pytest.approx(1e-6, abs=1e-6)
    moved = (boxes + np.array([[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 3.0, 0]], dtype=np.float32), scores, labels)
    monkeypatch.setattr(onnx_export, "pytorch_and_onnxruntime_outputs",
                        lambda wrapper, path, images: [((boxes, scores, labels), moved)])
    assert onnx_export.onnx_parity(None, "unused.onnx", [None])["max_box_diff"] == pytest.approx(3.0)
    relabelled = (boxes, scores, np.array([2, 2, 0]))
    monkeypatch.setattr(onnx_export, "pytorch_and_onnxruntime_outputs",
                        lambda wrapper, path, images: [((boxes, scores, labels), relabelled)])
    parity = onnx_export.onnx_parity(None, "unused.onnx", [None])
    assert parity["max_box_diff"] == float("inf") and parity["label_mismatches"] == 1


def test_providers_follow_model_device(caplog):
    from dinodet2.export import providers_for_device

    gpu_build = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert providers_for_device("cuda", gpu_build) == [("CUDAExecutionProvider", {"device_id": "0"}),
                                                       "CPUExecutionProvider"]
    assert providers_for_device("cuda:1", gpu_build)[0] == ("CUDAExecutionProvider", {"device_id": "1"})
    assert providers_for_device("cpu", gpu_build) == ["CPUExecutionProvider"]
    with caplog.at_level("WARNING"):
        assert providers_for_device("cuda", ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    assert "onnxruntime-gpu" in caplog.text
