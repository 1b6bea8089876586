from .adaptive_queries import AdaptiveQueryCount
from .box_encoding import box_sine_embedding, inverse_sigmoid
from .decoder_memory import DecoderMemory
from .deformable_attention import MultiScaleDeformableAttention, ms_deform_attn_sampling
from .deformable_layers import DeformableTransformerDecoderLayer, DeformableTransformerEncoderLayer
from .layers import TransformerDecoderLayer, TransformerEncoderLayer
from .multilevel_tokens import MultiLevelTokens
from .position_encoding import PositionEmbeddingSine
from .queries import QUERY_TYPES, AnchorQueries, LearnedQueries, QueryInit, TwoStageQueries, build_queries
from .query_pruning import DecodingStats, QueryPruning
from .sparse_encoder import SparseTokenSelector, TokenScorer, TokenSelection, select_tokens, token_foreground_targets
from .token_geometry import to_level_coordinates, token_anchors, valid_ratios
from .transformer import BoxHead, DetrDecoder, DetrEncoder, DetrTransformer, TransformerOutput
