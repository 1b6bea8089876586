from .box_encoding import box_sine_embedding, inverse_sigmoid
from .deformable_attention import MultiScaleDeformableAttention, ms_deform_attn_sampling
from .deformable_layers import DeformableTransformerDecoderLayer, DeformableTransformerEncoderLayer
from .layers import TransformerDecoderLayer, TransformerEncoderLayer
from .multilevel_tokens import MultiLevelTokens
from .position_encoding import PositionEmbeddingSine
from .queries import QUERY_TYPES, AnchorQueries, LearnedQueries, QueryInit, TwoStageQueries, build_queries
from .token_geometry import to_level_coordinates, token_anchors, valid_ratios
from .transformer import BoxHead, DetrDecoder, DetrEncoder, DetrTransformer
