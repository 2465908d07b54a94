"""An independent copy of meta-llama/Llama-3.2-1B's config.json, shared by the tests.

The tests keep their own copy rather than reading the project's: the synthetic "llama-3.2-1b" preset
is checked against it, so it must not come from the code under test; and shared/reference (where the
same file lies) may be absent, as in CI, so the tests that need the config cannot depend on it.
"""
from __future__ import annotations

from pathlib import Path

OFFICIAL_LLAMA_3_2_1B = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 128000, "eos_token_id": 128001, "head_dim": 64, "hidden_act": "silu",
    "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 8192,
    "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama",
    "num_attention_heads": 32, "num_hidden_layers": 16, "num_key_value_heads": 8, "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_cache": True,
    "vocab_size": 128256,
}  # meta-llama/Llama-3.2-1B config.json, as in shared/reference/llama-3.2-1b-config.json

# The same file in the shared folder beside the checkout; tests that read it skip when it is absent.
SHARED_REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "llama-3.2-1b-config.json"
