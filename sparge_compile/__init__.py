"""sparge-compile: hybrid Top-k + Top-p block-sparse attention for PyTorch, as a compiler backend.

    import sparge_compile as sc
    out = sc.sparse_attention(q, k, v, config=sc.SpargeConfig(topk=0.03, topp=0.2))
    model = torch.compile(model, backend="sparge")
"""
from .attention import predict_block_mask, sparse_attention
from .compiler import backend, explain
from .block_mask import SpargeBlockMask
from .calibrate import CalibrationError, calibrate
from .config import SpargeConfig
from .distill import DistillError, DistillResult, NonFiniteLossError, distill
from .flow import euler_sample, flow_matching_inputs, logit_normal_timesteps
from .plan import PlanMismatchError, SpargePlan

__all__ = ["SpargeConfig", "SpargeBlockMask", "backend", "explain", "predict_block_mask", "sparse_attention",
           "distill", "DistillResult", "DistillError", "NonFiniteLossError",
           "flow_matching_inputs", "euler_sample", "logit_normal_timesteps",
           "calibrate", "CalibrationError", "SpargePlan", "PlanMismatchError"]
__version__ = "0.1.0"
