"""distill(): fine-tune the sparse student against the frozen dense teacher (SpargeAttention2,
arXiv 2602.13515: AdamW, lr 1e-5, 500 steps, full-parameter).

    import sparge_compile as sc
    inputs = sc.flow_matching_inputs(latents, cond, batch_size=4)    # or any callable / iterable
    result = sc.distill(dit, inputs, steps=500, lr=1e-5, config=cfg, checkpoint_dir="ckpt")
    student, losses = result                                          # or result.student, result.losses

The teacher is a frozen deep copy of ``model`` taken before training (eval mode, no gradients,
never compiled with sparge; a ``torch.compile``-d model is unwrapped to its original module
first). The student is ``model`` itself (``inplace=True``, the default) or a deep copy of it,
compiled with the sparge backend so every attention runs block-sparse. Each step runs both on
the same batch and minimises the mean squared difference of their outputs.

Modules: ``api`` (distill() and the set-up of a run), ``loop`` (the steps, logging, Ctrl-C),
``student`` (teacher, student, parameters, optimizer, loss), ``checkpoint`` (RNG state, atomic
saves, resuming), ``results`` (DistillResult, DistillStep, the errors).
"""
from ..config import DistillConfig
from .api import distill
from .checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint_atomic
from .results import DistillError, DistillResult, DistillStep, NonFiniteLossError
from .student import make_student

__all__ = ["CHECKPOINT_NAME", "DistillConfig", "DistillError", "DistillResult", "DistillStep",
           "NonFiniteLossError", "distill", "load_checkpoint", "make_student", "save_checkpoint_atomic"]
