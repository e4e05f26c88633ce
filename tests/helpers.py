"""HF transformers references shared by the tests (fp32, CPU, eager attention)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from convert.names import state_from_hf
from qwq_jax import QwenConfig, init_model
from qwq_jax.model import set_params


def hf_config(cfg: QwenConfig) -> Qwen2Config:
    return Qwen2Config(**cfg.to_hf())


def hf_model(cfg: QwenConfig, seed: int = 0) -> Qwen2ForCausalLM:
    """A HF model with random weights everywhere (biases and norm scales too, so bugs show)."""
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM._from_config(hf_config(cfg), attn_implementation="eager", dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(0.05 * torch.randn_like(p))
    return model.eval()


def hf_tensors(model: Qwen2ForCausalLM) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def our_model_from_hf(cfg: QwenConfig, model: Qwen2ForCausalLM, **kwargs):
    """Our model (fp32 params and compute unless overridden) with the HF model's weights."""
    kwargs.setdefault("param_dtype", jnp.float32)
    kwargs.setdefault("dtype", jnp.float32)
    ours = init_model(cfg, **kwargs)
    return set_params(ours, state_from_hf(cfg, hf_tensors(model)))


def hf_logits(model: Qwen2ForCausalLM, tokens: np.ndarray, attention_mask: np.ndarray | None = None,
              position_ids: np.ndarray | None = None, hidden: bool = False):
    kwargs = {}
    if attention_mask is not None:
        kwargs["attention_mask"] = torch.from_numpy(np.asarray(attention_mask, np.int64))
    if position_ids is not None:
        kwargs["position_ids"] = torch.from_numpy(np.asarray(position_ids, np.int64))
    with torch.no_grad():
        out = model(torch.from_numpy(np.asarray(tokens, np.int64)), output_hidden_states=hidden, **kwargs)
    logits = out.logits.float().numpy()
    if hidden:
        return logits, [h.float().numpy() for h in out.hidden_states]
    return logits
