import pytest
import torch

from training.config import PRESETS, ConfigError, ModelConfig, TrainConfig, preset
from training.model import Transformer


@pytest.mark.parametrize("overrides, message", [
    ({"hidden_size": 100, "num_heads": 3}, "hidden_size 100 is not divisible by num_heads 3"),
    ({"num_heads": 4, "num_kv_heads": 3}, "num_heads 4 is not divisible by num_kv_heads 3"),
    ({"hidden_size": 12, "num_heads": 4, "num_kv_heads": 4}, "head_dim 3 (hidden_size / num_heads) must be even"),
    ({"num_layers": 0}, "num_layers must be a positive integer, not 0"),
    ({"vocab_size": -5}, "vocab_size must be a positive integer"),
    ({"rms_norm_eps": 0.0}, "must be positive"),
])
def test_invalid_shapes_fail_with_one_clear_line(overrides, message):
    with pytest.raises(ConfigError) as info:
        preset("debug", **overrides)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_unknown_preset_and_fields():
    with pytest.raises(ConfigError, match="unknown preset 'huge'; choose one of debug, tiny"):
        preset("huge")
    with pytest.raises(ConfigError, match="unknown field"):
        ModelConfig.from_dict({"hidden_size": 64, "colour": "blue"})


@pytest.mark.parametrize("overrides, message", [
    ({"batch_size": 0}, "--batch-size must be positive"),
    ({"warmup_steps": 500, "max_steps": 100}, "--warmup-steps must be between 0 and --max-steps"),
    ({"min_lr": 1.0, "lr": 0.1}, "--min-lr must be positive and at most --lr"),
    ({"method": "lora"}, "--method lora adapts an existing model: give --init-from"),
    ({"method": "magic"}, "--method must be full, lora, last-layer or bias"),
    ({"device": "tpu"}, "--device must be auto, cpu or cuda"),
])
def test_invalid_training_options(overrides, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**overrides).validate()


def test_presets_are_valid_and_the_124m_shape_has_the_expected_size():
    assert list(PRESETS) == ["debug", "tiny", "small", "124m", "350m", "1b"]
    with torch.device("meta"):
        model = Transformer(PRESETS["124m"])
    # 12 blocks of (4·768² attention + 3·768·2048 MLP + 2·768 norms) + 2 · 50304·768 + 768
    per_block = 4 * 768 * 768 + 3 * 768 * 2048 + 2 * 768
    assert model.num_parameters() == 12 * per_block + 2 * 50304 * 768 + 768
    with torch.device("meta"):
        big = Transformer(PRESETS["1b"])
    assert 1.0e9 < big.num_parameters() < 1.2e9


def test_flops_per_token_follows_the_documented_formula():
    config = preset("debug", vocab_size=300)
    model = Transformer(config)
    n = model.num_parameters() - 300 * 64  # the embedding lookup is not a matmul
    assert model.matmul_parameters() == n
    assert model.flops_per_token(128) == 6 * n + 12 * 2 * 4 * 16 * 128
    tied = Transformer(preset("debug", vocab_size=300, tie_embeddings=True))
    assert tied.matmul_parameters() == tied.num_parameters()


def test_causality_and_length_limit():
    torch.manual_seed(0)
    model = Transformer(preset("debug", vocab_size=100, max_seq_len=32)).eval()
    x = torch.randint(0, 100, (1, 20))
    y = x.clone()
    y[0, 10:] = (y[0, 10:] + 1) % 100
    with torch.no_grad():
        a, b = model(x)[0], model(y)[0]
    assert torch.equal(a[0, :10], b[0, :10])  # earlier positions never see later tokens
    with pytest.raises(ValueError, match="longer than max_seq_len 32"):
        model(torch.zeros(1, 33, dtype=torch.long))


@pytest.mark.parametrize("overrides", [{}, {"tie_embeddings": True}, {"attention_bias": True, "mlp_bias": True},
                                       {"num_kv_heads": 1}])
def test_parameter_arithmetic_matches_the_module(overrides):
    config = preset("debug", vocab_size=300, **overrides)
    model = Transformer(config)
    assert config.num_parameters() == model.num_parameters()
    assert config.matmul_parameters() == model.matmul_parameters()
    assert config.flops_per_token(64) == model.flops_per_token(64)
