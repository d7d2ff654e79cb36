"""Small models for the demo, tests and benchmarks."""
from .dit import DiT

__all__ = ["DiT"]
