import json

import pytest
from transformers import Qwen2Config

from qwq_jax.config import PRESETS, QwenConfig, RopeScaling

# The published Qwen/QwQ-32B config.json (with the YaRN block its model card tells users to add).
QWQ_32B_CONFIG = {
    "architectures": ["Qwen2ForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "hidden_act": "silu",
    "hidden_size": 5120,
    "initializer_range": 0.02,
    "intermediate_size": 27648,
    "max_position_embeddings": 40960,
    "max_window_layers": 64,
    "model_type": "qwen2",
    "num_attention_heads": 40,
    "num_hidden_layers": 64,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05,
    "rope_theta": 1000000.0,
    "sliding_window": 32768,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.43.1",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 152064,
    "rope_scaling": {"factor": 4.0, "original_max_position_embeddings": 32768, "type": "yarn"},
}

USED_FIELDS = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "rms_norm_eps", "rope_theta", "max_position_embeddings",
               "tie_word_embeddings", "vocab_size", "bos_token_id", "eos_token_id", "hidden_act",
               "model_type", "use_sliding_window"]


def test_qwq_32b_config_fields():
    cfg = QwenConfig.from_hf(QWQ_32B_CONFIG)
    assert (cfg.num_layers, cfg.hidden_size, cfg.intermediate_size) == (64, 5120, 27648)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.num_groups) == (40, 8, 128, 5)
    assert cfg.rms_norm_eps == 1e-5 and cfg.rope_theta == 1e6 and cfg.vocab_size == 152064
    assert not cfg.tie_word_embeddings
    assert cfg.rope_scaling == RopeScaling("yarn", 4.0, original_max_position_embeddings=32768)
    assert cfg.original_max_position_embeddings == 32768 and cfg.max_context == 131072
    # 32.8B parameters, as published.
    assert abs(cfg.num_params() / 1e9 - 32.76) < 0.01
    assert cfg == QwenConfig.preset("qwq-32b-yarn")


def test_round_trip_on_published_config(tmp_path):
    cfg = QwenConfig.from_hf(QWQ_32B_CONFIG)
    hf = cfg.to_hf()
    for field in USED_FIELDS:
        assert hf[field] == QWQ_32B_CONFIG[field], field
    assert hf["rope_scaling"]["factor"] == 4.0 and hf["rope_scaling"]["rope_type"] == "yarn"
    assert hf["rope_scaling"]["original_max_position_embeddings"] == 32768
    assert QwenConfig.from_hf(hf) == cfg
    # Through a file and a directory too.
    (tmp_path / "config.json").write_text(json.dumps(hf))
    assert QwenConfig.from_hf(tmp_path) == cfg
    assert QwenConfig.from_hf(tmp_path / "config.json") == cfg


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_round_trip_and_transformers_reads_them(name):
    cfg = QwenConfig.preset(name)
    assert QwenConfig.from_hf(cfg.to_hf()) == cfg
    hf = Qwen2Config(**cfg.to_hf())
    assert (hf.hidden_size, hf.num_hidden_layers, hf.num_key_value_heads) == (
        cfg.hidden_size, cfg.num_layers, cfg.num_kv_heads)
    assert hf.tie_word_embeddings == cfg.tie_word_embeddings


def test_published_parameter_counts():
    # Billions of parameters from the model cards.
    expected = {"qwen2.5-0.5b": 0.49, "qwen2.5-1.5b": 1.54, "qwen2.5-3b": 3.09, "qwen2.5-7b": 7.62,
                "qwen2.5-14b": 14.77, "qwen2.5-32b": 32.76, "qwen2.5-72b": 72.71}
    for name, billions in expected.items():
        assert abs(QwenConfig.preset(name).num_params() / 1e9 - billions) < 0.011, name


def test_rope_parameters_form_transformers_v5():
    """transformers>=5 writes `rope_parameters` (with rope_theta inside) instead of rope_scaling."""
    v5 = dict(QWQ_32B_CONFIG)
    del v5["rope_scaling"], v5["rope_theta"]
    v5["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768,
                             "rope_theta": 1000000.0}
    assert QwenConfig.from_hf(v5) == QwenConfig.from_hf(QWQ_32B_CONFIG)
    plain = dict(v5, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
    cfg = QwenConfig.from_hf(plain)
    assert cfg.rope_scaling is None and cfg.rope_theta == 1e6
    # What transformers itself writes for a config round-trips through us.
    written = Qwen2Config(**QwenConfig.preset("qwq-32b-yarn").to_hf()).to_dict()
    assert QwenConfig.from_hf(written) == QwenConfig.preset("qwq-32b-yarn")


def test_rope_type_key_and_extra_yarn_fields():
    c = dict(QWQ_32B_CONFIG, rope_scaling={"rope_type": "yarn", "factor": 2.0, "beta_fast": 16,
                                            "attention_factor": 1.5, "original_max_position_embeddings": 8192})
    rs = QwenConfig.from_hf(c).rope_scaling
    assert (rs.factor, rs.beta_fast, rs.attention_factor, rs.original_max_position_embeddings) == (2.0, 16, 1.5, 8192)
    assert QwenConfig.from_hf(QwenConfig.from_hf(c).to_hf()).rope_scaling == rs


@pytest.mark.parametrize("change, message", [
    ({"hidden_size": None}, "hidden_size is missing"),
    ({"num_hidden_layers": None}, "num_hidden_layers is missing"),
    ({"vocab_size": None}, "vocab_size is missing"),
    ({"rope_scaling": {"type": "dynamic-ntk", "factor": 2.0}}, "rope_type='dynamic-ntk'"),
    ({"rope_scaling": {"rope_type": "longrope", "factor": 2.0}}, "rope_type='longrope'"),
    ({"use_sliding_window": True}, "use_sliding_window=True"),
    ({"num_key_value_heads": 7}, "num_attention_heads=40 is not divisible by num_key_value_heads=7"),
    ({"hidden_size": 5121}, "hidden_size=5121 is not divisible by num_attention_heads=40"),
    ({"model_type": "llama"}, "model_type='llama'"),
    ({"architectures": ["LlamaForCausalLM"]}, "architectures="),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"num_hidden_layers": 0}, "num_layers=0"),
    ({"rope_scaling": {"type": "linear"}}, "rope_scaling.factor is missing"),
    # wrong JSON types: one line naming the field, not a TypeError from arithmetic on it
    ({"hidden_size": "5120"}, "hidden_size='5120' must be an integer"),
    ({"rms_norm_eps": "1e-5"}, "rms_norm_eps='1e-5' must be a number"),
    ({"rope_theta": [1]}, "rope_theta=[1] must be a number"),
    ({"architectures": "Qwen2ForCausalLM"}, "architectures='Qwen2ForCausalLM' must be a list of names"),
    ({"eos_token_id": "x"}, "eos_token_id='x' must be a token id or a list of them"),
])
def test_bad_configs_name_field_and_value(change, message):
    bad = dict(QWQ_32B_CONFIG)
    for key, value in change.items():
        if value is None:
            bad.pop(key)
        else:
            bad[key] = value
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        QwenConfig.from_hf(bad)


def test_bad_files(tmp_path):
    with pytest.raises(ValueError, match="config file not found"):
        QwenConfig.from_hf(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        QwenConfig.from_hf(tmp_path)
    with pytest.raises(ValueError, match="unknown preset"):
        QwenConfig.preset("qwen3-8b")
