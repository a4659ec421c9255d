"""Model and training configuration: small dataclasses, named presets, one clear line per mistake."""
import math
from dataclasses import asdict, dataclass, field, fields, replace


class ConfigError(ValueError):
    """A configuration that cannot work; the message is one line that says what to change."""


@dataclass(frozen=True)
class ModelConfig:
    """A Llama-architecture decoder; field names follow what they mean, `to_hf()` maps to LlamaConfig."""

    vocab_size: int = 512
    hidden_size: int = 64
    intermediate_size: int = 176
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    init_std: float = 0.02
    # Long-context RoPE of public checkpoints, as config.json gives it: {"rope_type": "llama3" | "linear", "factor",
    # and for llama3 "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}. None: plain RoPE.
    rope_scaling: dict | None = None

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                     "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"ModelConfig: {name} must be a positive integer, not {value!r}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"ModelConfig: hidden_size {self.hidden_size} is not divisible by num_heads "
                              f"{self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"ModelConfig: num_heads {self.num_heads} is not divisible by num_kv_heads "
                              f"{self.num_kv_heads} (grouped-query attention shares each kv head across a group)")
        if self.head_dim % 2:
            raise ConfigError(f"ModelConfig: head_dim {self.head_dim} (hidden_size / num_heads) must be even for RoPE")
        if not self.rope_theta > 0 or not self.rms_norm_eps > 0 or not self.init_std > 0:
            raise ConfigError("ModelConfig: rope_theta, rms_norm_eps and init_std must be positive")
        if self.rope_scaling is not None:
            _check_rope_scaling(self.rope_scaling)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def num_parameters(self) -> int:
        """Parameter count by arithmetic (no torch), equal to Transformer(config).num_parameters()."""
        h, kv = self.hidden_size, self.num_kv_heads * self.head_dim
        attention = 2 * h * h + 2 * h * kv + ((2 * h + 2 * kv) if self.attention_bias else 0)
        mlp = 3 * h * self.intermediate_size + ((2 * self.intermediate_size + h) if self.mlp_bias else 0)
        embeddings = self.vocab_size * h * (1 if self.tie_embeddings else 2)
        return self.num_layers * (attention + mlp + 2 * h) + h + embeddings

    def matmul_parameters(self) -> int:
        """N in 6·N·D: the embedding lookup is not a matmul unless it is tied to the output head."""
        return self.num_parameters() - (0 if self.tie_embeddings else self.vocab_size * self.hidden_size)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token, PaLM/nanoGPT form: 6N + 12·L·H·Q·T."""
        return 6.0 * self.matmul_parameters() + 12.0 * self.num_layers * self.num_heads * self.head_dim * seq_len

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"ModelConfig: unknown field(s) {', '.join(unknown)}")
        return cls(**data)

    def to_hf(self, *, bos_token_id: int | None = None, eos_token_id: int | None = None,
              torch_dtype: str = "float32") -> dict:
        """A transformers LlamaConfig dictionary (config.json)."""
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers, "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads, "head_dim": self.head_dim,
            "max_position_embeddings": self.max_seq_len, "rope_theta": self.rope_theta,
            **({"rope_scaling": dict(self.rope_scaling)} if self.rope_scaling else {}),
            "rms_norm_eps": self.rms_norm_eps, "tie_word_embeddings": self.tie_embeddings,
            "attention_bias": self.attention_bias, "mlp_bias": self.mlp_bias, "hidden_act": "silu",
            "initializer_range": self.init_std, "attention_dropout": 0.0, "torch_dtype": torch_dtype,
            "bos_token_id": bos_token_id, "eos_token_id": eos_token_id, "use_cache": True,
        }

    @classmethod
    def from_hf(cls, config: dict) -> "ModelConfig":
        """Read a Hugging Face Llama config.json (ours or anyone's)."""
        if config.get("model_type") not in ("llama", None):
            raise ConfigError(f"config.json describes a {config.get('model_type')!r} model; only Llama-architecture "
                              "checkpoints are supported")
        missing = [key for key in ("num_attention_heads", "hidden_size", "intermediate_size", "num_hidden_layers",
                                   "vocab_size") if key not in config]
        if missing:
            raise ConfigError(f"config.json lacks {', '.join(missing)}: not a complete Llama config")
        if config.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"config.json: hidden_act {config['hidden_act']!r} is not supported (Llama uses silu)")
        heads = config["num_attention_heads"]
        head_dim = config.get("head_dim") or config["hidden_size"] // heads
        if head_dim * heads != config["hidden_size"]:
            raise ConfigError("config.json: head_dim x num_attention_heads must equal hidden_size")
        # transformers 5 writes rope_parameters (theta and scaling in one object); earlier versions rope_theta and
        # rope_scaling. Read both: a theta silently left at its default would give wrong logits.
        rope = config.get("rope_parameters") if isinstance(config.get("rope_parameters"), dict) else {}
        scaling = config.get("rope_scaling") or {k: v for k, v in rope.items() if k != "rope_theta"}
        scaling = dict(scaling) if isinstance(scaling, dict) else scaling
        if isinstance(scaling, dict) and "type" in scaling and "rope_type" not in scaling:
            scaling["rope_type"] = scaling.pop("type")  # the older spelling
        if isinstance(scaling, dict) and scaling.get("rope_type", "default") == "default":
            scaling = None
        theta = config.get("rope_theta") or rope.get("rope_theta") or 10000.0
        return cls(
            vocab_size=config["vocab_size"], hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"], num_layers=config["num_hidden_layers"],
            num_heads=heads, num_kv_heads=config.get("num_key_value_heads") or heads,
            max_seq_len=config.get("max_position_embeddings", 2048), rope_theta=float(theta), rope_scaling=scaling,
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(config.get("tie_word_embeddings", False)),
            attention_bias=bool(config.get("attention_bias", False)), mlp_bias=bool(config.get("mlp_bias", False)),
            init_std=float(config.get("initializer_range", 0.02)),
        )


ROPE_SCALING_KEYS = {"linear": ("factor",),
                     "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}


def _check_rope_scaling(scaling) -> None:
    kind = scaling.get("rope_type") if isinstance(scaling, dict) else None
    if kind not in ROPE_SCALING_KEYS:
        raise ConfigError(f"rope scaling {kind or scaling!r} is not supported (supported: "
                          f"{', '.join(ROPE_SCALING_KEYS)}); the model would compute wrong positions")
    for key in ROPE_SCALING_KEYS[kind]:
        value = scaling.get(key)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
            raise ConfigError(f"{kind} rope scaling needs a positive {key}, not {value!r}")
    if kind == "llama3" and not scaling["high_freq_factor"] > scaling["low_freq_factor"]:
        raise ConfigError("llama3 rope scaling needs high_freq_factor > low_freq_factor")


# Named shapes. The vocabulary comes from the tokenizer at training time.
PRESETS: dict[str, ModelConfig] = {
    "debug": ModelConfig(hidden_size=64, intermediate_size=176, num_layers=2, num_heads=4, num_kv_heads=2,
                         max_seq_len=256),
    "tiny": ModelConfig(hidden_size=128, intermediate_size=352, num_layers=4, num_heads=4, num_kv_heads=2,
                        max_seq_len=512),
    "small": ModelConfig(hidden_size=384, intermediate_size=1024, num_layers=6, num_heads=6, num_kv_heads=6,
                         max_seq_len=1024),
    # GPT-2 124M's width and depth with SwiGLU 2048, as in the performance anchors.
    "124m": ModelConfig(vocab_size=50304, hidden_size=768, intermediate_size=2048, num_layers=12, num_heads=12,
                        num_kv_heads=12, max_seq_len=1024),
    "350m": ModelConfig(vocab_size=50304, hidden_size=1024, intermediate_size=2816, num_layers=24, num_heads=16,
                        num_kv_heads=16, max_seq_len=2048),
    # TinyLlama 1.1B's shape.
    "1b": ModelConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_layers=22, num_heads=32,
                      num_kv_heads=4, max_seq_len=2048),
}


def preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    try:
        return replace(PRESETS[name], **overrides)
    except TypeError as exc:
        raise ConfigError(f"preset {name}: {exc}") from None


ATTENTION_KERNELS = ("auto", "cudnn", "flash", "efficient", "math")
# reduce-overhead replays the step's forward and backward as CUDA graphs (no launch gaps). The loop copies each step's
# loss out of the graph's output before the next replay; gradients are graph outputs too, so no accumulation.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs")
RESIDUAL_DTYPES = ("float32", "bfloat16")
HEAD_LOSSES = ("auto", "plain", "fused", "triton")


@dataclass
class TrainConfig:
    """How to train. Every field has a CLI flag of the same name (dashes for underscores)."""

    data: str = ""  # a folder written by `python -m training prepare`
    out: str = "runs/run"  # checkpoints, events and the export go here
    preset: str = "debug"
    vocab_size: int = 0  # 0: the tokenizer's; larger pads the embedding (e.g. 50304, a multiple of 64, is faster)
    init_from: str = ""  # an exported Hugging Face folder to fine-tune instead of a fresh model
    method: str = "full"  # full | lora | last-layer | bias (only with init_from)
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    batch_size: int = 8
    seq_len: int = 128
    grad_accum: int = 1
    max_steps: int = 200
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_interval: int = 50
    eval_batches: int = 8
    checkpoint_interval: int = 100
    seed: int = 1337
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | float32 | bfloat16
    compile: str = "auto"  # auto (on CUDA) | yes | no
    # default | reduce-overhead (CUDA graphs of the step; one process, no accumulation) | max-autotune-no-cudagraphs
    # (Triton matmuls tuned per shape; slow to compile)
    compile_mode: str = "default"
    attention: str = "auto"  # the attention kernel SDPA prefers: auto (PyTorch's choice) | cudnn | flash | efficient | math
    # float32: under bf16 autocast the residual stream stays fp32, as in transformers; bfloat16: it is bf16 too, as in
    # torchtitan's bf16 parameter dtype (half the activation traffic between the matmuls; needs bf16)
    residual_dtype: str = "float32"
    # plain: logits, then cross_entropy; fused: the head's matmul and the loss as one autograd step that keeps the
    # loss's gradient instead of the logits (compiled, model.HeadLoss: one pass less over the tokens x vocab logits,
    # +1.4% on an H200, 124M shape; eager, model.HeadLossInBlocks: a block of rows at a time, in place, -3 to -8% of a
    # CPU step, 'small' preset); triton: fused, with the loss's pass over the logits one hand-written Triton kernel
    # (training.kernels; CUDA only) in place of inductor's. auto: fused
    head_loss: str = "auto"
    # no: clip_grad_norm_ then fused AdamW, eagerly; yes: both through torch.compile (the clipping, then, past the
    # graph break in torch.optim's step, a foreach AdamW: inductor's own kernels for each; +1.6% on an H200, 124M
    # shape); auto: yes where the model is compiled (on CUDA by default)
    compile_optimizer: str = "auto"
    run_id: str = ""
    license: str = ""  # the exported card's license; defaults to the data's license
    datasets: tuple[str, ...] = ()  # registry dataset ids (org/name) named in the exported card
    base_model_id: str = ""  # the base's registry id (org/name): the card's base_model (without it, named in the text)
    extra: dict = field(default_factory=dict)

    def validate(self) -> None:
        for f in fields(self):  # inf or NaN passes every comparison below, and trains a model of NaNs
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"--{f.name.replace('_', '-')} must be a finite number, not {value}")
        positive = ("batch_size", "seq_len", "grad_accum", "max_steps", "eval_interval", "eval_batches",
                    "checkpoint_interval", "lora_rank")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive, not {getattr(self, name)}")
        if self.warmup_steps < 0 or self.warmup_steps > self.max_steps:
            raise ConfigError(f"--warmup-steps must be between 0 and --max-steps ({self.max_steps})")
        if not 0 < self.min_lr <= self.lr:
            raise ConfigError(f"--min-lr must be positive and at most --lr ({self.lr})")
        if self.method not in ("full", "lora", "last-layer", "bias"):
            raise ConfigError(f"--method must be full, lora, last-layer or bias, not {self.method!r}")
        if self.method == "lora" and not self.lora_alpha > 0:
            raise ConfigError(f"--lora-alpha must be positive, not {self.lora_alpha}")
        if self.method == "lora" and not self.lora_targets:
            raise ConfigError("--lora-targets is empty: name the projections to adapt, e.g. q_proj,v_proj")
        if self.method != "full" and not self.init_from:
            raise ConfigError(f"--method {self.method} adapts an existing model: give --init-from EXPORT_DIR")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"--device must be auto, cpu or cuda, not {self.device!r}")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ConfigError(f"--dtype must be auto, float32 or bfloat16, not {self.dtype!r}")
        if self.compile not in ("auto", "yes", "no"):
            raise ConfigError(f"--compile must be auto, yes or no, not {self.compile!r}")
        if self.compile_mode not in COMPILE_MODES:
            raise ConfigError(f"--compile-mode must be one of {', '.join(COMPILE_MODES)}, not {self.compile_mode!r}")
        if self.compile_mode == "reduce-overhead" and self.grad_accum > 1:
            raise ConfigError("--compile-mode reduce-overhead replays graphs whose outputs are the gradients, which "
                              "a second micro-batch would overwrite: use --grad-accum 1 or another compile mode")
        if self.attention not in ATTENTION_KERNELS:
            raise ConfigError(f"--attention must be one of {', '.join(ATTENTION_KERNELS)}, not {self.attention!r}")
        if self.residual_dtype not in RESIDUAL_DTYPES:
            raise ConfigError(f"--residual-dtype must be float32 or bfloat16, not {self.residual_dtype!r}")
        if self.residual_dtype == "bfloat16" and self.dtype == "float32":
            raise ConfigError("--residual-dtype bfloat16 needs bf16 training: drop --dtype float32")
        if self.compile_optimizer not in ("auto", "yes", "no"):
            raise ConfigError(f"--compile-optimizer must be auto, yes or no, not {self.compile_optimizer!r}")
        if self.head_loss not in HEAD_LOSSES:
            raise ConfigError(f"--head-loss must be auto, plain, fused or triton, not {self.head_loss!r}")
        if self.vocab_size < 0:
            raise ConfigError("--vocab-size cannot be negative (0 means the tokenizer's size)")
        if self.grad_clip < 0 or self.weight_decay < 0:
            raise ConfigError("--grad-clip and --weight-decay cannot be negative")
