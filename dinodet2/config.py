"""Every config key dinodet2 adds to Detectron2's YACS config, with its default.

Call :func:`add_dinodet2_config` on a fresh ``get_cfg()`` before merging a dinodet2 YAML file.
Keys are grouped by the component they configure:

* ``MODEL.DINOV2``  -- the DINOv2 vision transformer (HF ``transformers``)
* ``MODEL.LORA``    -- LoRA adapters on the backbone (HF ``peft``)
* ``MODEL.SFP``     -- the simple feature pyramid neck
* ``MODEL.DETR``    -- the DETR meta-architecture: transformer, matcher, losses
* ``MODEL.COMPILE`` -- torch.compile of the backbone / transformer
* ``INPUT.AUG``     -- single- and multi-image training augmentations
* ``CURRICULUM``    -- easy-to-hard sampling, query ramp-up, staged matching
* ``SOLVER``        -- optimizer (AdamW), parameter-group LR multipliers, DDP options, non-finite steps,
                      mixed precision, gradient accumulation, EMA of the weights
* ``TEST.SLICED``   -- sliced (tiled) inference for large images
"""
from detectron2.config import CfgNode as CN

# DINOv2 was trained on ImageNet-normalised RGB; these are those statistics scaled to [0, 255].
IMAGENET_PIXEL_MEAN_RGB = [123.675, 116.28, 103.53]
IMAGENET_PIXEL_STD_RGB = [58.395, 57.12, 57.375]


def add_dinodet2_config(cfg):
    """Add dinodet2's config keys (with defaults) to ``cfg`` in place and return it."""
    _C = cfg

    # ----------------------------------------------------------------------------------------
    # DINOv2 backbone
    # ----------------------------------------------------------------------------------------
    _C.MODEL.DINOV2 = CN()
    # HuggingFace Hub id (e.g. "facebook/dinov2-base", "facebook/dinov2-with-registers-base")
    # or a local directory written by `save_pretrained`.
    _C.MODEL.DINOV2.NAME = "facebook/dinov2-base"
    # Build a randomly initialised DINOv2 from the size keys below instead of loading NAME.
    _C.MODEL.DINOV2.RANDOM_INIT = False
    # Size keys, used only when RANDOM_INIT is True.
    _C.MODEL.DINOV2.HIDDEN_SIZE = 768
    _C.MODEL.DINOV2.NUM_LAYERS = 12
    _C.MODEL.DINOV2.NUM_HEADS = 12
    _C.MODEL.DINOV2.MLP_RATIO = 4.0
    _C.MODEL.DINOV2.PATCH_SIZE = 14
    _C.MODEL.DINOV2.PRETRAIN_IMAGE_SIZE = 518
    _C.MODEL.DINOV2.NUM_REGISTER_TOKENS = 0
    # 0-based indices of the transformer blocks whose outputs are returned (-1 = last block).
    # Output feature names are "layer{i}" with i the non-negative block index.
    _C.MODEL.DINOV2.OUT_INDICES = [-1]
    # Apply DINOv2's final LayerNorm to every returned layer (as HF's Dinov2Backbone does).
    _C.MODEL.DINOV2.APPLY_LAYERNORM = True
    # Freeze all pretrained backbone weights (LoRA adapters still train). False = full fine-tuning.
    _C.MODEL.DINOV2.FREEZE = True
    # Partial fine-tuning with FREEZE True: also train every LayerNorm / the last N blocks
    # (at SOLVER.BACKBONE_LR_MULTIPLIER x the base LR).
    _C.MODEL.DINOV2.UNFREEZE_NORMS = False
    _C.MODEL.DINOV2.UNFREEZE_LAST_N_BLOCKS = 0
    # Drop-path rate inside the ViT blocks.
    _C.MODEL.DINOV2.DROP_PATH_RATE = 0.0
    # Only load files already on disk (never contact the Hub). Also honoured: HF_HUB_OFFLINE=1.
    _C.MODEL.DINOV2.LOCAL_FILES_ONLY = False
    # Windowed attention (ViTDet / RF-DETR): these 0-based blocks (negative = from the end; [] = off)
    # attend inside NUM_WINDOWS x NUM_WINDOWS non-overlapping windows of the patch grid, the others
    # globally; CLS/register tokens are copied into every window and averaged afterwards. Weights and
    # parameter names are unchanged. Inputs are padded to multiples of PATCH_SIZE x NUM_WINDOWS.
    _C.MODEL.DINOV2.WINDOW_BLOCK_INDEXES = []
    _C.MODEL.DINOV2.NUM_WINDOWS = 4

    # ----------------------------------------------------------------------------------------
    # LoRA adapters (peft)
    # ----------------------------------------------------------------------------------------
    _C.MODEL.LORA = CN()
    _C.MODEL.LORA.ENABLED = True
    _C.MODEL.LORA.RANK = 4
    _C.MODEL.LORA.ALPHA = 4.0
    _C.MODEL.LORA.DROPOUT = 0.0
    # Module families to adapt. Families are resolved to the module names of the installed
    # transformers version (4.x: attention.attention.query/key/value, attention.output.dense;
    # 5.x: attention.q_proj/k_proj/v_proj/o_proj). Allowed: query, key, value, attn_out, fc1, fc2.
    _C.MODEL.LORA.TARGET_MODULES = ["query", "value"]
    # Blocks that get adapters: [] = all, or 0-based indices (negative = from the end) ...
    _C.MODEL.LORA.LAYERS = []
    # ... or only the last N blocks (0 = not used).
    _C.MODEL.LORA.LAST_N_LAYERS = 0
    # Per-layer ranks / alphas: rules "<blocks>[/<families>]=<value>", blocks "*", "7" or "0-5",
    # e.g. ["0-5=4", "6-11=16", "*/fc1,fc2=8"]; later rules win; unmatched modules use RANK / ALPHA.
    _C.MODEL.LORA.RANK_PATTERN = []
    _C.MODEL.LORA.ALPHA_PATTERN = []
    # Weight-decomposed LoRA (DoRA, peft's use_dora).
    _C.MODEL.LORA.USE_DORA = False
    # AdaLoRA (peft): adapters start at rank INIT_R and singular values are pruned by importance to an
    # average rank TARGET_R over SOLVER.MAX_ITER - TFINAL steps (no pruning in the first TINIT steps,
    # budget updated every DELTA_T steps). RANK / RANK_PATTERN / USE_DORA are not used with it. The
    # orthogonality penalty is reported as loss_adalora_orth; the final ranks are logged and written
    # to OUTPUT_DIR/adalora_rank_allocation.json.
    _C.MODEL.LORA.ADALORA = CN()
    _C.MODEL.LORA.ADALORA.ENABLED = False
    _C.MODEL.LORA.ADALORA.INIT_R = 12
    _C.MODEL.LORA.ADALORA.TARGET_R = 4
    _C.MODEL.LORA.ADALORA.TINIT = 0
    _C.MODEL.LORA.ADALORA.TFINAL = 0
    _C.MODEL.LORA.ADALORA.DELTA_T = 10
    _C.MODEL.LORA.ADALORA.BETA1 = 0.85
    _C.MODEL.LORA.ADALORA.BETA2 = 0.85
    _C.MODEL.LORA.ADALORA.ORTH_REG_WEIGHT = 0.5

    # ----------------------------------------------------------------------------------------
    # Simple feature pyramid neck (ViTDet style, explicit strides for patch 14)
    # ----------------------------------------------------------------------------------------
    _C.MODEL.SFP = CN()
    # Backbone features feeding the pyramid: [] = the backbone's last output for every level,
    # one name (e.g. "layer11") for all levels, or one name per scale factor (multi-layer pyramid).
    _C.MODEL.SFP.IN_FEATURES = []
    # Resampling factors relative to the patch grid: 2.0 -> stride 7, 1.0 -> 14, 0.5 -> 28.
    # Allowed: 4.0, 2.0, 1.0, 0.5, 0.25.
    _C.MODEL.SFP.SCALE_FACTORS = [2.0, 1.0, 0.5]
    _C.MODEL.SFP.OUT_CHANNELS = 256
    # Norm after each conv: "LN" (channel LayerNorm, as ViTDet), "GN", "BN", "SyncBN" or "".
    _C.MODEL.SFP.NORM = "LN"
    # How to downsample for factors < 1: "maxpool" (ViTDet) or "conv" (strided conv).
    _C.MODEL.SFP.DOWNSAMPLE = "maxpool"

    # ----------------------------------------------------------------------------------------
    # DETR meta-architecture
    # ----------------------------------------------------------------------------------------
    _C.MODEL.DETR = CN()
    _C.MODEL.DETR.NUM_CLASSES = 80
    # Backbone / neck features given to the transformer ([] = all of them, in stride order).
    _C.MODEL.DETR.IN_FEATURES = []
    _C.MODEL.DETR.HIDDEN_DIM = 256
    _C.MODEL.DETR.NUM_QUERIES = 100
    # Anchor (DAB-DETR) queries: learned 4-D anchor boxes; every decoder layer generates its
    # positional query from its current reference box (sine embedding + MLP); content queries
    # are learned. Implied by TWO_STAGE (whose reference boxes come from proposals).
    _C.MODEL.DETR.ANCHOR_QUERIES = False
    # Two-stage: every encoder token (all pyramid levels) proposes a box (supervised by "*_enc"
    # losses); the top NUM_QUERIES proposals become the decoder's reference boxes. Needs a
    # sigmoid CLASS_LOSS ("focal" or "varifocal").
    _C.MODEL.DETR.TWO_STAGE = False
    # With TWO_STAGE: learned content queries (DINO's mixed query selection) if True, else the
    # selected tokens' (detached) features.
    _C.MODEL.DETR.MIXED_QUERY_SELECTION = True
    # Levels (indices in MODEL.DETR.IN_FEATURES order, finest first by default) that only the decoder's
    # cross-attention reads: the encoder layers do not update their tokens (they stay its keys / values)
    # and two-stage proposals do not come from them. Makes a fine level (e.g. stride 3.5 from
    # MODEL.SFP.SCALE_FACTORS 4.0) affordable: the encoder's cost stays that of the other levels.
    _C.MODEL.DETR.DECODER_ONLY_LEVELS = []
    # Scale-aware prediction heads (dinodet2.modeling.transformer.scale_aware). PROPOSAL_HEADS
    # "per_level": with TWO_STAGE, every feature level's proposals come from its own class / box head
    # ("shared": one head for all levels). DECODER_HEADS "size_conditioned": every decoder layer's state
    # is modulated by the size of its reference box (FiLM, identity at initialisation) before the class
    # and box heads ("shared": heads read the state as it is). Need reference-box queries.
    _C.MODEL.DETR.SCALE_AWARE = CN()
    _C.MODEL.DETR.SCALE_AWARE.PROPOSAL_HEADS = "shared"
    _C.MODEL.DETR.SCALE_AWARE.DECODER_HEADS = "shared"
    # When queries have references (ANCHOR_QUERIES, TWO_STAGE or DEFORMABLE.DECODER): each decoder
    # layer's box becomes the next layer's reference (detached between layers).
    _C.MODEL.DETR.ITERATIVE_REFINEMENT = True
    # DINO's look forward twice: a layer's box is predicted relative to the previous layer's
    # undetached box, so each layer's loss also trains the layer before. Needs ITERATIVE_REFINEMENT.
    _C.MODEL.DETR.LOOK_FORWARD_TWICE = False
    # Multi-scale deformable attention (pure PyTorch, grid_sample; sampling in fp32 under AMP).
    # The number of levels is the number of MODEL.DETR.IN_FEATURES (e.g. the SFP levels).
    _C.MODEL.DETR.DEFORMABLE = CN()
    # Encoder layers (ENC_LAYERS of them) use deformable self-attention over all levels.
    _C.MODEL.DETR.DEFORMABLE.ENCODER = False
    # Decoder cross-attention is deformable around each query's reference point/box.
    _C.MODEL.DETR.DEFORMABLE.DECODER = False
    # Sampling points per head and level.
    _C.MODEL.DETR.DEFORMABLE.NUM_POINTS = 4
    # Heads of the deformable attention (0 = MODEL.DETR.NHEADS).
    _C.MODEL.DETR.DEFORMABLE.NHEADS = 0
    # Sparse encoder tokens (Sparse DETR / Focus-DETR; dinodet2.modeling.transformer.sparse_encoder):
    # a small MLP scores every encoder input token's foreground probability; the encoder layers update
    # only the top KEEP_RATIO of each image's valid tokens (ceil(KEEP_RATIO x valid), at least 1;
    # padding never), which attend to all tokens; the others pass through unchanged. PER_LEVEL: the
    # ratio on every pyramid level instead of one top-k over all levels. The scorer learns from
    # "loss_token_fg" (weight LOSS_WEIGHT > 0): sigmoid focal loss (FOCAL_ALPHA / FOCAL_GAMMA) towards
    # "the token's centre lies in a ground-truth box (widened to one token cell)". Needs
    # ENC_LAYERS >= 1 (standard or deformable). KEEP_RATIO 1.0 gives the dense encoder's detections.
    _C.MODEL.DETR.SPARSE_ENCODER = CN()
    _C.MODEL.DETR.SPARSE_ENCODER.ENABLED = False
    _C.MODEL.DETR.SPARSE_ENCODER.KEEP_RATIO = 0.3
    _C.MODEL.DETR.SPARSE_ENCODER.PER_LEVEL = False
    _C.MODEL.DETR.SPARSE_ENCODER.LOSS_WEIGHT = 1.0
    # The keep ratio in inference (0 = KEEP_RATIO): e.g. train with KEEP_RATIO 1.0 (dense encoder; the
    # scorer still learns) and run sparse at test time with the same weights.
    _C.MODEL.DETR.SPARSE_ENCODER.TEST_KEEP_RATIO = 0.0
    # Denoising training (DN-DETR; contrastive denoising from DINO). Needs reference-box queries
    # (ANCHOR_QUERIES or TWO_STAGE). Losses "*_dn" are reported separately.
    _C.MODEL.DETR.DN = CN()
    _C.MODEL.DETR.DN.ENABLED = False
    # Budget of denoising queries per image; groups = NUM_QUERIES // (2 x max objects per image).
    _C.MODEL.DETR.DN.NUM_QUERIES = 100
    # Probability x 0.5 that a denoising query's label is replaced by a random class.
    _C.MODEL.DETR.DN.LABEL_NOISE_RATIO = 0.5
    # Box corners move by up to BOX_NOISE_SCALE x half the box size (negatives: 1x-2x that).
    _C.MODEL.DETR.DN.BOX_NOISE_SCALE = 1.0
    # Add negative (reject-as-no-object) queries: DINO's contrastive denoising.
    _C.MODEL.DETR.DN.CONTRASTIVE = True
    # Cascade box refinement on the finest feature level (dinodet2.modeling.refinement): after the
    # decoder, NUM_STAGES chained stages roi_align the finest token level (the projected backbone
    # features) inside every query's box (POOL_SIZE x POOL_SIZE bins, SAMPLING_RATIO samples per bin
    # side, <= 0 adaptive), fuse it with the query's decoder state (width HIDDEN_DIM, 0 = MODEL.DETR.
    # HIDDEN_DIM) and predict a box delta (and, with RESCORE, a class-logit delta). Stage k trains on
    # the final layer's matches whose incoming box has IoU >= IOU_THRESHOLDS[k] (one per stage) with
    # their target, with the decoder's L1 / GIoU (/ class) weights: "*_refine_{k}" losses. Inference
    # uses the last stage's boxes (and logits). Off: no parameters, no state-dict keys.
    _C.MODEL.DETR.REFINEMENT = CN()
    _C.MODEL.DETR.REFINEMENT.ENABLED = False
    _C.MODEL.DETR.REFINEMENT.NUM_STAGES = 3
    _C.MODEL.DETR.REFINEMENT.IOU_THRESHOLDS = (0.5, 0.6, 0.7)
    _C.MODEL.DETR.REFINEMENT.POOL_SIZE = 7
    _C.MODEL.DETR.REFINEMENT.SAMPLING_RATIO = 2
    _C.MODEL.DETR.REFINEMENT.HIDDEN_DIM = 0
    _C.MODEL.DETR.REFINEMENT.RESCORE = False
    # Inference-time efficiency (dinodet2.modeling.transformer.adaptive_queries / query_pruning);
    # off by default. Every threshold at its trivial value gives the full model's detections.
    # Adaptive query count (TWO_STAGE): per image, keep the proposals whose best class probability
    # is >= SCORE_THRESHOLD, clamped to [MIN_QUERIES, MAX_QUERIES] (0 = NUM_QUERIES). Inference
    # only; training keeps the fixed top NUM_QUERIES. Threshold 0: the fixed top-k.
    _C.MODEL.DETR.ADAPTIVE_QUERIES = CN()
    _C.MODEL.DETR.ADAPTIVE_QUERIES.ENABLED = False
    _C.MODEL.DETR.ADAPTIVE_QUERIES.SCORE_THRESHOLD = 0.05
    _C.MODEL.DETR.ADAPTIVE_QUERIES.MIN_QUERIES = 1
    _C.MODEL.DETR.ADAPTIVE_QUERIES.MAX_QUERIES = 0
    # Progressive query pruning and early termination of the decoder (inference only): after each
    # layer from START_LAYER on, queries whose best class probability is < DROP_SCORE are dropped,
    # queries with probability >= FREEZE_SCORE whose box moved by <= FREEZE_BOX_DELTA (largest change
    # of a normalised cx/cy/w/h) are frozen; both keep their last prediction; the decoder stops when
    # no query is left. DROP_SCORE 0 and FREEZE_SCORE > 1: the full decoder.
    _C.MODEL.DETR.QUERY_PRUNING = CN()
    _C.MODEL.DETR.QUERY_PRUNING.ENABLED = False
    _C.MODEL.DETR.QUERY_PRUNING.DROP_SCORE = 0.05
    _C.MODEL.DETR.QUERY_PRUNING.FREEZE_SCORE = 0.9
    _C.MODEL.DETR.QUERY_PRUNING.FREEZE_BOX_DELTA = 0.01
    _C.MODEL.DETR.QUERY_PRUNING.START_LAYER = 1
    # Any-depth decoding: inference runs only the first TEST_DEC_LAYERS decoder layers (0 = all);
    # every layer is trained to predict (DEEP_SUPERVISION), so any depth gives detections.
    _C.MODEL.DETR.TEST_DEC_LAYERS = 0
    _C.MODEL.DETR.NHEADS = 8
    _C.MODEL.DETR.ENC_LAYERS = 0
    _C.MODEL.DETR.DEC_LAYERS = 6
    _C.MODEL.DETR.DIM_FEEDFORWARD = 2048
    # Dropout on the residual branches of every transformer layer.
    _C.MODEL.DETR.DROPOUT = 0.1
    # Dropout on attention weights (DETR's original: 0.1). 0 lets PyTorch use fused attention, several
    # times faster in training on CPU; DROPOUT still applies to residual branches and FFNs.
    _C.MODEL.DETR.ATTENTION_DROPOUT = 0.0
    # Dropout on the FFN's hidden activations (DETR's original: 0.1; HF's DETR: 0).
    _C.MODEL.DETR.ACTIVATION_DROPOUT = 0.0
    _C.MODEL.DETR.PRE_NORM = False
    # Auxiliary losses on every decoder layer.
    _C.MODEL.DETR.DEEP_SUPERVISION = True
    # Classification loss: "ce" (softmax over NUM_CLASSES + no-object), "focal" (sigmoid focal)
    # or "varifocal" (IoU-aware: sigmoid, the matched class's target is the predicted box's IoU).
    # Sigmoid losses use the focal matching cost and top-k over queries x classes at inference.
    _C.MODEL.DETR.CLASS_LOSS = "ce"
    # Relative weight of the no-object class in the cross-entropy loss.
    _C.MODEL.DETR.NO_OBJECT_WEIGHT = 0.1
    _C.MODEL.DETR.FOCAL_ALPHA = 0.25
    _C.MODEL.DETR.FOCAL_GAMMA = 2.0
    # Weight of the negatives in the varifocal loss (its gamma is FOCAL_GAMMA).
    _C.MODEL.DETR.VARIFOCAL_ALPHA = 0.75
    # Loss weights.
    _C.MODEL.DETR.CLASS_WEIGHT = 1.0
    _C.MODEL.DETR.L1_WEIGHT = 5.0
    _C.MODEL.DETR.GIOU_WEIGHT = 2.0
    # Hungarian matching cost weights.
    _C.MODEL.DETR.COST_CLASS = 1.0
    _C.MODEL.DETR.COST_BBOX = 5.0
    _C.MODEL.DETR.COST_GIOU = 2.0

    # ----------------------------------------------------------------------------------------
    # torch.compile (dinodet2.engine.compilation); off by default
    # ----------------------------------------------------------------------------------------
    # Compile MODULES of the model in place (nn.Module.compile: state_dict keys, checkpoints, DDP and
    # LoRA merging are unchanged) for training and inference. Graphs and graph breaks are logged at
    # the first call and reported as compile/* training metrics; where compilation fails (no C++
    # compiler, a backend that does not import, a dynamo error at the first call) a warning says so and
    # the module runs eagerly.
    _C.MODEL.COMPILE = CN()
    _C.MODEL.COMPILE.ENABLED = False
    # torch.compile's mode: "default", "reduce-overhead", "max-autotune", ... (inductor's modes).
    _C.MODEL.COMPILE.MODE = "default"
    # torch.compile backend: "inductor" (generated C++ / Triton kernels), "aot_eager", "eager", ...
    _C.MODEL.COMPILE.BACKEND = "inductor"
    # torch.compile's dynamic. True (default): sizes are symbolic from the first compilation, so
    # batches of other image sizes (multi-scale training, aspect-ratio groups, evaluation) reuse it;
    # measured on the (shrunk) demo over 30 iterations: 3 compilations (one more for the batches without
    # padding), where None took 7. None: compile for the first shapes, then once more for every
    # dimension seen to change (best for fixed-size inputs). False: one compilation per shape; after
    # torch._dynamo.config.recompile_limit of them the module runs eagerly.
    _C.MODEL.COMPILE.DYNAMIC = True
    # Submodules of the meta-architecture to compile (dotted names): the tensor-heavy parts, not the
    # Python pre- / post-processing (ImageList, Hungarian matching, Instances). Default: the backbone
    # only; inductor's CPU code for the deformable attention (decomposed grid_sample) is several times
    # slower than eager, so add "transformer" only where it measures faster (README, torch.compile).
    _C.MODEL.COMPILE.MODULES = ["backbone"]

    # ----------------------------------------------------------------------------------------
    # Token feature alignment (dinodet2.modeling.training_signals.token_alignment); off by default
    # ----------------------------------------------------------------------------------------
    # A training-only loss "loss_token_align": one level of the detector's tokens, through a linear
    # projector, is pulled towards the patch tokens a frozen DINOv2 gives the same image. The frozen
    # model: the detector's own ViT with its LoRA adapters switched off (LoRA on frozen weights), a
    # frozen copy of the ViT as built (when the ViT trains), or TEACHER. Neither it nor the projector
    # is in merged / exported weights; the frozen model is never in a checkpoint.
    _C.MODEL.TOKEN_ALIGNMENT = CN()
    _C.MODEL.TOKEN_ALIGNMENT.ENABLED = False
    # "encoder": the encoder's output tokens; "neck": the tokens the encoder reads (pyramid level
    # after the input projection).
    _C.MODEL.TOKEN_ALIGNMENT.SOURCE = "encoder"
    # Index of the transformer level to align (in MODEL.DETR.IN_FEATURES order, finest first by
    # default); -1: the level whose stride is nearest to the DINOv2 patch size (stride 14).
    _C.MODEL.TOKEN_ALIGNMENT.LEVEL = -1
    # A DINOv2 to align to instead of the backbone's own pretrained one: Hub id or local
    # save_pretrained directory (e.g. a larger DINOv2; the projector maps to its width). "": the own.
    _C.MODEL.TOKEN_ALIGNMENT.TEACHER = ""
    # Block of the frozen DINOv2 whose tokens (after its final LayerNorm) are the target; negative
    # from the end. For the own ViT: among the blocks the backbone keeps (up to its last OUT_INDICES).
    _C.MODEL.TOKEN_ALIGNMENT.TEACHER_BLOCK = -1
    # "cosine": 1 - cosine similarity per token (RT-DETRv4); "mse": squared error per channel.
    _C.MODEL.TOKEN_ALIGNMENT.LOSS = "cosine"
    _C.MODEL.TOKEN_ALIGNMENT.WEIGHT = 1.0

    # ----------------------------------------------------------------------------------------
    # Knowledge distillation from a larger model (dinodet2.modeling.training_signals); off by default
    # ----------------------------------------------------------------------------------------
    # A frozen teacher (any dinodet2 model: its own config file + trained weights, e.g. a larger DINOv2
    # and / or more decoder layers) runs in the same step without gradients; never in a checkpoint.
    _C.MODEL.DISTILL = CN()
    _C.MODEL.DISTILL.ENABLED = False
    _C.MODEL.DISTILL.TEACHER_CONFIG = ""
    _C.MODEL.DISTILL.TEACHER_WEIGHTS = ""
    # KEY VALUE overrides for the teacher's config (e.g. ["MODEL.DINOV2.NAME", "/path/to/dinov2-large"]).
    _C.MODEL.DISTILL.TEACHER_OPTS = []
    # Every distillation loss ramps linearly from 0 to its weight over these iterations (0: none).
    _C.MODEL.DISTILL.WARMUP_ITERS = 0
    # Feature level ("loss_distill_feature"): every level's tokens, projected to the teacher's width,
    # pulled to the teacher's tokens of that level (same strides needed). 0 switches it off.
    _C.MODEL.DISTILL.FEATURE_WEIGHT = 1.0
    # "encoder" (encoder outputs) or "neck" (the tokens the encoder reads), in both models.
    _C.MODEL.DISTILL.FEATURE_SOURCE = "encoder"
    # "mse" (squared error per channel) or "cosine" (1 - cosine similarity) per token.
    _C.MODEL.DISTILL.FEATURE_LOSS = "mse"
    # Weight of tokens whose centre lies inside a ground-truth box (the others: 1; 1 = uniform).
    _C.MODEL.DISTILL.FEATURE_FOREGROUND_WEIGHT = 1.0
    # Prediction level: the teacher's final predictions matched one to one to the student's queries
    # (Hungarian, DETRDistill-style); "loss_distill_class" (BCE to the teacher's probabilities, or
    # T^2 KL for softmax heads), "loss_distill_bbox" (L1), "loss_distill_giou"; each pair weighted by
    # the teacher's detection score. The weights also weigh the matching costs.
    _C.MODEL.DISTILL.PREDICTION = CN()
    _C.MODEL.DISTILL.PREDICTION.ENABLED = True
    _C.MODEL.DISTILL.PREDICTION.CLASS_WEIGHT = 1.0
    _C.MODEL.DISTILL.PREDICTION.BOX_WEIGHT = 5.0
    _C.MODEL.DISTILL.PREDICTION.GIOU_WEIGHT = 2.0
    # Softmax heads (MODEL.DETR.CLASS_LOSS "ce"): distillation temperature.
    _C.MODEL.DISTILL.PREDICTION.TEMPERATURE = 1.0
    # Distil only the teacher's TOP_K best-scoring queries per image (0: all of them).
    _C.MODEL.DISTILL.PREDICTION.TOP_K = 0

    # ----------------------------------------------------------------------------------------
    # Single-image training augmentations (dinodet2.data.augmentations); all off by default
    # ----------------------------------------------------------------------------------------
    _C.INPUT.AUG = CN()
    # Large-scale jitter: resize by a factor in SCALE_RANGE of a SIZE x SIZE target, crop/pad to it.
    _C.INPUT.AUG.LSJ = CN()
    _C.INPUT.AUG.LSJ.ENABLED = False
    _C.INPUT.AUG.LSJ.SCALE_RANGE = (0.1, 2.0)
    _C.INPUT.AUG.LSJ.SIZE = 1024
    # DETR's random resize + crop, applied with probability PROB before the multi-scale resize.
    _C.INPUT.AUG.DETR_CROP = CN()
    _C.INPUT.AUG.DETR_CROP.ENABLED = False
    _C.INPUT.AUG.DETR_CROP.PROB = 0.5
    _C.INPUT.AUG.DETR_CROP.RESIZE_SIZES = (400, 500, 600)
    _C.INPUT.AUG.DETR_CROP.CROP_SIZE = (384, 600)
    # Photometric distortion: each op applied with probability PROB; factor ranges; HUE is the
    # maximum shift as a fraction of the colour circle.
    _C.INPUT.AUG.PHOTOMETRIC = CN()
    _C.INPUT.AUG.PHOTOMETRIC.ENABLED = False
    _C.INPUT.AUG.PHOTOMETRIC.PROB = 0.5
    _C.INPUT.AUG.PHOTOMETRIC.BRIGHTNESS = (0.875, 1.125)
    _C.INPUT.AUG.PHOTOMETRIC.CONTRAST = (0.5, 1.5)
    _C.INPUT.AUG.PHOTOMETRIC.SATURATION = (0.5, 1.5)
    _C.INPUT.AUG.PHOTOMETRIC.HUE = 0.05
    # After augmentation, boxes are clipped to the image; a box is dropped when its clipped width or
    # height is <= MIN_BOX_SIZE pixels or less than MIN_VISIBILITY of its area stays in the image.
    _C.INPUT.AUG.MIN_BOX_SIZE = 0.0
    _C.INPUT.AUG.MIN_VISIBILITY = 0.0

    # ----------------------------------------------------------------------------------------
    # Multi-image training augmentations (dinodet2.data.multi_image), applied in this order before
    # the single-image ones, each with probability PROB; extra images are drawn at random from the
    # same training set. All off by default. MIN_BOX_SIZE / MIN_VISIBILITY above also decide which
    # cut or covered boxes are dropped (visibility = the box's pixels left uncovered).
    # ----------------------------------------------------------------------------------------
    # Mosaic: 4 images, each resized so its longer side is SIZE, placed around a random centre of a
    # 2*SIZE x 2*SIZE canvas (centre in CENTER_RANGE x SIZE); the canvas is cropped to the images.
    _C.INPUT.AUG.MOSAIC = CN()
    _C.INPUT.AUG.MOSAIC.ENABLED = False
    _C.INPUT.AUG.MOSAIC.PROB = 0.5
    _C.INPUT.AUG.MOSAIC.SIZE = 640
    _C.INPUT.AUG.MOSAIC.CENTER_RANGE = (0.5, 1.5)
    # MixUp: a second image, resized to fit inside the first, blended as r*A + (1-r)*B with
    # r ~ Beta(ALPHA, ALPHA); boxes of both are kept. LABEL_WEIGHTING: A's boxes weigh r and B's 1-r
    # in the matched losses (classification, L1, GIoU).
    _C.INPUT.AUG.MIXUP = CN()
    _C.INPUT.AUG.MIXUP.ENABLED = False
    _C.INPUT.AUG.MIXUP.PROB = 0.5
    _C.INPUT.AUG.MIXUP.ALPHA = 1.5
    _C.INPUT.AUG.MIXUP.LABEL_WEIGHTING = False
    # CutMix: a rectangle covering a fraction in AREA_RANGE of the image (same aspect ratio) is
    # replaced by the same region of a second image (resized to cover the first); its boxes are cut to
    # the region, boxes of the first image under it are reduced to their visible part or dropped.
    _C.INPUT.AUG.CUTMIX = CN()
    _C.INPUT.AUG.CUTMIX.ENABLED = False
    _C.INPUT.AUG.CUTMIX.PROB = 0.5
    _C.INPUT.AUG.CUTMIX.AREA_RANGE = (0.1, 0.5)
    # Copy-Paste: 1..MAX_OBJECTS objects cut from other images (with their segmentation mask when
    # the dataset has one and USE_MASKS, else their box) are pasted at random places, rescaled by a
    # factor in SCALE_RANGE (relative to the two images' shorter sides). An object of class c is
    # drawn with probability proportional to n_c ** -RARE_CLASS_POWER (n_c: objects of class c in the
    # training set): 0 = as frequent as in the data, 1 = every class equally often.
    _C.INPUT.AUG.COPY_PASTE = CN()
    _C.INPUT.AUG.COPY_PASTE.ENABLED = False
    _C.INPUT.AUG.COPY_PASTE.PROB = 0.5
    _C.INPUT.AUG.COPY_PASTE.MAX_OBJECTS = 3
    _C.INPUT.AUG.COPY_PASTE.SCALE_RANGE = (0.5, 1.5)
    _C.INPUT.AUG.COPY_PASTE.RARE_CLASS_POWER = 1.0
    _C.INPUT.AUG.COPY_PASTE.USE_MASKS = True
    # Grey level of padding (Mosaic canvas, MixUp around the second image).
    _C.INPUT.AUG.PAD_VALUE = 114
    # Switch Mosaic / MixUp / CutMix / Copy-Paste off for the last N training iterations (YOLOX's
    # "no-aug" epochs; TrainLoaderScheduleHook rebuilds the loader at MAX_ITER - N). 0 = never.
    _C.INPUT.AUG.STRONG_OFF_LAST_ITERS = 0

    # ----------------------------------------------------------------------------------------
    # Curriculum learning (dinodet2.data.curriculum_sampler, dinodet2.engine.curriculum_schedules); all off by default
    # ----------------------------------------------------------------------------------------
    _C.CURRICULUM = CN()
    # Easy-to-hard sampling: every training image gets a difficulty score from its annotations,
    #   w_count * objects / max objects + w_small * fraction of small boxes + w_overlap * mean over
    #   boxes of the highest IoU with another box in the image   (w = DIFFICULTY_WEIGHTS),
    # and the sampler draws from the easiest START_FRACTION of the images, growing to all of them at
    # RAMP_ITERS (SCHEDULE "linear" or "sqrt").
    _C.CURRICULUM.SAMPLING = CN()
    _C.CURRICULUM.SAMPLING.ENABLED = False
    _C.CURRICULUM.SAMPLING.START_FRACTION = 0.3
    _C.CURRICULUM.SAMPLING.RAMP_ITERS = 1000
    _C.CURRICULUM.SAMPLING.SCHEDULE = "linear"
    _C.CURRICULUM.SAMPLING.DIFFICULTY_WEIGHTS = (1.0, 1.0, 1.0)
    # A box is small when its area (original image pixels) is below this (COCO: 32 * 32).
    _C.CURRICULUM.SAMPLING.SMALL_AREA = 1024.0
    # Query ramp-up: the decoder uses START_QUERIES queries at iteration 0, growing linearly to
    # MODEL.DETR.NUM_QUERIES at RAMP_ITERS.
    _C.CURRICULUM.QUERIES = CN()
    _C.CURRICULUM.QUERIES.ENABLED = False
    _C.CURRICULUM.QUERIES.START_QUERIES = 25
    _C.CURRICULUM.QUERIES.RAMP_ITERS = 1000
    # Staged matching: the Hungarian matcher uses STAGES[i] until iteration STEPS[i], then the full
    # cost. Stages: "l1" (box L1 only), "boxes" (L1 + GIoU, class-agnostic), "full".
    _C.CURRICULUM.MATCHING = CN()
    _C.CURRICULUM.MATCHING.ENABLED = False
    _C.CURRICULUM.MATCHING.STAGES = ["l1", "boxes"]
    _C.CURRICULUM.MATCHING.STEPS = [200, 500]

    # ----------------------------------------------------------------------------------------
    # Optimisation
    # ----------------------------------------------------------------------------------------
    # "ADAMW" (default) or "SGD" (Detectron2's builder).
    _C.SOLVER.OPTIMIZER = "ADAMW"
    _C.SOLVER.BETAS = (0.9, 0.999)
    # PyTorch's fused (single-kernel) optimizer update, on CPU and CUDA.
    _C.SOLVER.FUSED = True
    # LR multiplier for LoRA adapter parameters of the backbone.
    _C.SOLVER.LORA_LR_MULTIPLIER = 1.0
    # LR multiplier for explicitly unfrozen (non-LoRA) backbone parameters.
    _C.SOLVER.BACKBONE_LR_MULTIPLIER = 0.1
    # LR multiplier for deformable attention's sampling offsets and Deformable DETR's reference
    # point projection (x0.1 in the literature).
    _C.SOLVER.DEFORMABLE_LR_MULTIPLIER = 0.1
    # Weight decay for embeddings (object queries, position/level embeddings, cls/register tokens).
    _C.SOLVER.WEIGHT_DECAY_EMBED = 0.0
    # Write checkpoints with only the trainable weights (LoRA, neck, decoder, heads, unfrozen backbone
    # weights) + buffers + the config; loading fills the frozen backbone from MODEL.DINOV2.NAME.
    _C.SOLVER.CHECKPOINT_TRAINABLE_ONLY = False
    # Pass find_unused_parameters=True to DistributedDataParallel.
    _C.SOLVER.DDP_FIND_UNUSED_PARAMETERS = False
    # A step whose loss or gradients are NaN/inf: "stop" (raise before the optimizer step, so the
    # weights and the last checkpoint stay finite) or "skip" (drop the step's gradients; stop after
    # MAX_CONSECUTIVE_SKIPS skipped steps in a row).
    _C.SOLVER.NONFINITE = CN()
    _C.SOLVER.NONFINITE.POLICY = "stop"
    _C.SOLVER.NONFINITE.MAX_CONSECUTIVE_SKIPS = 10
    # Exponential moving average of the weights (dinodet2.engine.ema); off by default. Averaged: the
    # trainable parameters and the buffers (float32), updated after every optimizer step with decay
    # DECAY * (1 - exp(-k / TAU)) at the k-th update (TAU 0: DECAY throughout). Checkpoints carry it
    # ("ema"), so --resume continues it exactly.
    _C.SOLVER.EMA = CN()
    _C.SOLVER.EMA.ENABLED = False
    _C.SOLVER.EMA.DECAY = 0.9997
    _C.SOLVER.EMA.TAU = 2000.0
    # Evaluate (TEST.EVAL_PERIOD and after training) with the EMA weights swapped in.
    _C.SOLVER.EMA.EVAL_WITH_EMA = True
    # What a checkpoint's "model" holds: "ema" (the averaged weights: --eval-only, MODEL.WEIGHTS and the
    # tools use them; the live weights are kept under "training_weights" for --resume) or "live".
    _C.SOLVER.EMA.CHECKPOINT_MODEL = "ema"
    # Autocast dtype with SOLVER.AMP.ENABLED: "float16" (CUDA, with a GradScaler; Detectron2's AMPTrainer)
    # or "bfloat16" (CUDA or CPU, no GradScaler). Matching, losses and deformable sampling stay fp32.
    # (Detectron2 versions that define the key keep their default.)
    if "PRECISION" not in _C.SOLVER.AMP:
        _C.SOLVER.AMP.PRECISION = "float16"
    # Micro-batches per optimizer step (1: none). SOLVER.IMS_PER_BATCH stays the batch of one optimizer
    # step; each process runs it as ACCUMULATION_STEPS micro-batches of IMS_PER_BATCH / (world size x
    # ACCUMULATION_STEPS) images. MAX_ITER, the LR schedule and the periods count optimizer steps.
    _C.SOLVER.ACCUMULATION_STEPS = 1

    # ----------------------------------------------------------------------------------------
    # Sliced (tiled) inference for large images (dinodet2.inference.sliced); off by default
    # ----------------------------------------------------------------------------------------
    _C.TEST.SLICED = CN()
    # Evaluate (Trainer.test, --eval-only) with sliced inference: the test loader gives original-size
    # images, and the detector runs on tiles (each resized by INPUT.MIN_SIZE_TEST / MAX_SIZE_TEST).
    _C.TEST.SLICED.ENABLED = False
    # Tile side in original-image pixels (tiles are clipped to smaller images: one tile = the image).
    _C.TEST.SLICED.TILE_SIZE = 512
    # Overlap of neighbouring tiles: a fraction of TILE_SIZE (< 1) or pixels (>= 1). Objects up to this
    # size are whole in some tile.
    _C.TEST.SLICED.OVERLAP = 0.2
    # Also run the whole image (resized as usual) and merge its detections with the tiles'.
    _C.TEST.SLICED.FULL_IMAGE = True
    # Class-aware merge of the detections: "nms" (torchvision batched_nms) or "wbf" (weighted box fusion).
    _C.TEST.SLICED.MERGE = "nms"
    # IoU above which two detections of one class are merged.
    _C.TEST.SLICED.MERGE_IOU = 0.5
    # Detections kept per image after merging.
    _C.TEST.SLICED.MAX_DETECTIONS = 100
    # Tiles per forward pass of the detector.
    _C.TEST.SLICED.TILE_BATCH = 8
    # A tile's box within this many pixels of an inner tile edge, and inside the neighbouring tile
    # across it, is a cut copy and is dropped before merging (the neighbour sees more of the object).
    _C.TEST.SLICED.CUT_BOX_MARGIN = 2.0

    # ----------------------------------------------------------------------------------------
    # CPU memory allocator (dinodet2.engine.cpu_allocator); process-wide, applied by the tools
    # ----------------------------------------------------------------------------------------
    _C.CPU_ALLOCATOR = CN()
    # glibc malloc keeps freed memory for reuse (trim threshold 1 GiB, mmap threshold 32 MiB) instead of
    # returning it to the OS, so tensors do not page-fault anew in every step: a faster CPU forward and
    # training step (README, "CPU speed"); resident memory stays at its peak. Ignored off Linux/glibc and
    # when MALLOC_*_ environment variables or an LD_PRELOAD-ed jemalloc/tcmalloc already set the allocator.
    _C.CPU_ALLOCATOR.KEEP_FREED_MEMORY = True

    return cfg


def load_dinodet2_config(config_file: str, opts=(), freeze: bool = True):
    """A config as the tools build it: Detectron2's defaults + dinodet2's keys + YAML file +
    ``KEY VALUE`` overrides (frozen unless ``freeze=False``)."""
    from detectron2.config import get_cfg

    cfg = add_dinodet2_config(get_cfg())
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts))
    if freeze:
        cfg.freeze()
    return cfg
