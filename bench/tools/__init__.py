"""GPU tools for kernel work (not benchmarks with a report): ``python -m bench tune`` times the
kernels' variants and launch settings, ``python -m bench profile`` profiles them and reads the
compiler's report. Both need CUDA."""
import torch


def require_cuda(name: str) -> None:
    """A clear error instead of a Triton launch failure on a machine without a GPU."""
    if not torch.cuda.is_available():
        raise SystemExit(f"python -m bench {name}: needs a CUDA GPU (torch.cuda.is_available() is False)")
