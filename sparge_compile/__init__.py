"""sparge-compile: hybrid Top-k + Top-p block-sparse attention for PyTorch, as a compiler backend.

    import sparge_compile as sc
    out = sc.sparse_attention(q, k, v, config=sc.SpargeConfig(topk=0.03, topp=0.2))
    model = torch.compile(model, backend="sparge")
"""
from .attention import predict_block_mask, sparse_attention
from .block_mask import SpargeBlockMask
from .config import SpargeConfig

__all__ = ["SpargeConfig", "SpargeBlockMask", "predict_block_mask", "sparse_attention"]
__version__ = "0.1.0"
