"""Test set-up: 8 fake CPU devices, set before anything imports jax."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# ---- the offline demo model (DESIGN.md): shared by every test that needs the real weights ------
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def demo_path() -> Path:
    """The demo GGUF, assembled once per machine into the default cache dir (491 MB)."""
    from qwq_jax import demo

    return demo.demo_gguf_path(progress=False)


@pytest.fixture(scope="session")
def demo_hf_model(demo_path):
    """transformers' float32 model of the demo GGUF (dequantized by its own GGUF loader)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(demo_path.parent), gguf_file=demo_path.name,
                                                 dtype=torch.float32, attn_implementation="eager")
    return model.eval()


@pytest.fixture(scope="session")
def demo_hf_tokenizer(demo_path):
    """transformers' tokenizer of the demo GGUF."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(demo_path.parent), gguf_file=demo_path.name)


@pytest.fixture(scope="session")
def demo_checkpoint(demo_path):
    """The demo GGUF converted to a float32 qwq-jax checkpoint, once per machine (like `sample --demo`)."""
    from qwq_jax.sample import demo_checkpoint

    return demo_checkpoint()
