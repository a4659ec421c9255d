"""Checkpoints made by transformers itself, shaped like public Llama releases (grouped-query attention, tied
embeddings, Llama 3.1's long-context RoPE, transformers 5's rope_parameters): our model's logits and the engine's
greedy output equal transformers' own."""
import shutil

import pytest
import torch

from training.config import ConfigError, ModelConfig
from training.engine import Engine, SamplingParams
from training.export import load_exported

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}


def _hf_checkpoint(directory, tokenizer_dir, *, rope_scaling, rope_theta=500000.0, tie=True):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=tie, rope_theta=rope_theta, rope_scaling=rope_scaling,
                         bos_token_id=None, eos_token_id=None)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # transformers' init is tiny; spread the weights so positions matter to the logits
        for p in model.parameters():
            p.normal_(0, 0.2) if p.dim() > 1 else None
    model.save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, directory / name)
    return model


@pytest.mark.parametrize("rope_scaling", [None, LLAMA3, {"rope_type": "linear", "factor": 4.0}])
def test_logits_and_greedy_output_equal_transformers_on_its_own_checkpoints(tmp_path, data_dir, rope_scaling):
    hf = _hf_checkpoint(tmp_path, data_dir, rope_scaling=rope_scaling)
    ours, _ = load_exported(tmp_path)
    assert ours.config.rope_theta == 500000.0 and ours.config.tie_embeddings and ours.config.num_kv_heads == 2
    ids = torch.randint(0, 512, (1, 200), generator=torch.Generator().manual_seed(1))  # past the original 64
    with torch.no_grad():
        assert (ours.eval()(ids)[0] - hf(ids).logits).abs().max().item() < 1e-4

    engine = Engine(tmp_path, device="cpu", max_batch=4)
    prompt = ids[0, :120].tolist()
    with torch.no_grad():
        expected = hf.generate(ids[:, :120], max_new_tokens=24, do_sample=False, eos_token_id=None,
                               pad_token_id=0)[0, 120:].tolist()
    request = engine.submit(prompt, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))
    engine.run_until_idle()
    assert request.output_ids == expected


@pytest.mark.parametrize("decode", ["dynamic", "static"])
def test_grouped_query_rows_at_different_lengths_and_slots_equal_generate(tmp_path, data_dir, monkeypatch, decode):
    # Decode reads each key head once for its group of query heads: rows of different lengths (the masked step),
    # in scattered slots (the block view; static: the fixed-shape step graphs replay), each equal to transformers'
    # generate alone.
    hf = _hf_checkpoint(tmp_path, data_dir, rope_scaling=None)
    engine = Engine(tmp_path, device="cpu", max_batch=6, decode=decode)
    ids = torch.randint(0, 512, (5, 90), generator=torch.Generator().manual_seed(2))
    lengths = [90, 17, 55, 3, 40]
    expected = []
    with torch.no_grad():
        for row, n in enumerate(lengths):
            expected.append(hf.generate(ids[row:row + 1, :n], max_new_tokens=12, do_sample=False, eos_token_id=None,
                                        pad_token_id=0)[0, n:].tolist())
    placed = []
    index_copy = torch.Tensor.index_copy_
    monkeypatch.setattr(torch.Tensor, "index_copy_", lambda self, *args: placed.append(1) or index_copy(self, *args))
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    requests = [engine.submit(ids[0, :lengths[0]].tolist(), params)]
    filler = [engine.submit(ids[0, :5].tolist(), SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))]
    engine.step()  # the filler takes slot 1, and leaves a hole there after its two tokens
    requests += [engine.submit(ids[row, :n].tolist(), params) for row, n in enumerate(lengths[1:], 1)]
    engine.run_until_idle()
    assert filler[0].finish_reason == "length" and bool(placed) == (decode == "dynamic")  # the view was taken
    assert [r.output_ids for r in requests] == expected


def test_rope_scaling_we_cannot_compute_is_refused_in_one_line():
    with pytest.raises(ConfigError, match="rope scaling 'yarn' is not supported"):
        ModelConfig.from_hf({**ModelConfig().to_hf(), "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(ConfigError, match="llama3 rope scaling needs a positive low_freq_factor"):
        ModelConfig.from_hf({**ModelConfig().to_hf(), "rope_scaling": {**LLAMA3, "low_freq_factor": None}})


def test_our_export_writes_rope_scaling_transformers_reads(tmp_path):
    from transformers import LlamaConfig

    config = ModelConfig(rope_scaling=LLAMA3, max_seq_len=256)
    assert ModelConfig.from_hf(config.to_hf()) == config
    assert LlamaConfig.from_dict(config.to_hf()).rope_parameters["rope_type"] == "llama3"
