"""qwq-jax: QwQ-32B / Qwen2.5 in JAX + Flax NNX."""

from qwq_jax.config import QwenConfig, RopeScaling
from qwq_jax.model import Qwen2, abstract_model, forward, init_model

__all__ = ["QwenConfig", "RopeScaling", "Qwen2", "abstract_model", "forward", "init_model"]
__version__ = "0.1.0"
from qwq_jax.checkpoint import load  # noqa: E402

__all__ += ["load"]
