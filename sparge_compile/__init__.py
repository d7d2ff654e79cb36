"""sparge-compile: hybrid Top-k + Top-p block-sparse attention for PyTorch, as a compiler backend.

    import sparge_compile as sc
    out = sc.sparse_attention(q, k, v, config=sc.SpargeConfig(topk=0.03, topp=0.2))
    model = torch.compile(model, backend="sparge")
"""
from .attention import predict_block_mask, sparse_attention
from .block_mask import SpargeBlockMask
from .calibration import CalibrationError, calibrate
from .compiler import SpargeBackend, backend, explain
from .config import CalibrateConfig, DistillConfig, SpargeConfig
from .distillation import DistillError, DistillResult, NonFiniteLossError, distill
from .flow import euler_sample, flow_matching_inputs, logit_normal_timesteps
from .linear_branch import LinearBranch, enable_linear_branch, sparse_linear_attention
from .parallel import ring_attention, ulysses_attention, usp_attention, usp_groups
from .plan import PlanMismatchError, SpargePlan

__all__ = ["CalibrateConfig", "CalibrationError", "DistillConfig", "DistillError", "DistillResult",
           "LinearBranch", "NonFiniteLossError", "PlanMismatchError", "SpargeBackend", "SpargeBlockMask",
           "SpargeConfig", "SpargePlan", "backend", "calibrate", "distill", "enable_linear_branch",
           "euler_sample", "explain", "flow_matching_inputs", "logit_normal_timesteps", "predict_block_mask",
           "ring_attention", "sparse_attention", "sparse_linear_attention", "ulysses_attention",
           "usp_attention", "usp_groups"]
__version__ = "0.1.0"
