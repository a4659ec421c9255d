"""Build small Hugging Face-style model folders (config, safetensors weights, card) for the demo and tests.

The weights are deterministic random stand-ins shaped like a tiny Llama; nothing is downloaded.
"""
import json
from pathlib import Path

import numpy as np
import yaml
from safetensors.numpy import save_file


def llama_config(*, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2, vocab: int = 256,
                 context: int = 256) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": hidden * 4, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "vocab_size": vocab, "max_position_embeddings": context,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False, "torch_dtype": "float32",
    }


def llama_weights(config: dict, *, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    h, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    kv = h // config["num_attention_heads"] * config["num_key_value_heads"]

    def w(*shape):
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    tensors = {"model.embed_tokens.weight": w(vocab, h), "model.norm.weight": np.ones(h, np.float32),
               "lm_head.weight": w(vocab, h)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        tensors |= {
            p + "self_attn.q_proj.weight": w(h, h), p + "self_attn.k_proj.weight": w(kv, h),
            p + "self_attn.v_proj.weight": w(kv, h), p + "self_attn.o_proj.weight": w(h, h),
            p + "mlp.gate_proj.weight": w(inter, h), p + "mlp.up_proj.weight": w(inter, h),
            p + "mlp.down_proj.weight": w(h, inter),
            p + "input_layernorm.weight": np.ones(h, np.float32), p + "post_attention_layernorm.weight": np.ones(h, np.float32),
        }
    return tensors


def card_text(metadata: dict, body: str) -> str:
    return "---\n" + yaml.safe_dump(metadata, sort_keys=False) + "---\n\n" + body.strip() + "\n"


def write_model_folder(directory: Path, *, metadata: dict | None = None, body: str = "# Model\n", seed: int = 0,
                       config: dict | None = None) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = config or llama_config()
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    (directory / "generation_config.json").write_text(json.dumps({"max_new_tokens": 128, "temperature": 0.8}))
    save_file(llama_weights(config, seed=seed), str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "README.md").write_text(card_text(metadata or {}, body))
    return directory
