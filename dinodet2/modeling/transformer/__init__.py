from .detr_transformer import DetrTransformer, TransformerDecoderLayer, TransformerEncoderLayer
from .position_encoding import PositionEmbeddingSine
from .two_stage import TwoStageDetrTransformer, box_sine_embedding, inverse_sigmoid, token_anchors
