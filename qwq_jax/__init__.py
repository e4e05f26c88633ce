"""qwq-jax: QwQ-32B / Qwen2.5 in JAX + Flax NNX."""

import sys as _sys

if "flax" not in _sys.modules and "IPython" not in _sys.modules:
    # Flax NNX asks at import whether it runs under IPython (to colour its reprs) by importing IPython:
    # 0.5 s of every start where IPython is installed (the test and notebook extras) but not running.
    # A process that has not imported IPython is not an IPython kernel, so flax is told it is absent
    # for the length of its import; anything imported later finds the real one.
    _sys.modules["IPython"] = None  # type: ignore[assignment]  # (None: "import IPython" fails at once)
    try:
        import flax.nnx  # noqa: F401
    finally:
        del _sys.modules["IPython"]

from qwq_jax.config import QwenConfig, RopeScaling
from qwq_jax.model import Qwen2, abstract_model, forward, init_model

__all__ = ["QwenConfig", "RopeScaling", "Qwen2", "abstract_model", "forward", "init_model"]
__version__ = "0.1.0"
from qwq_jax.checkpoint import load  # noqa: E402

__all__ += ["load"]
