"""Adapting an exported model: full fine-tuning, LoRA, last layer only, or biases only (BitFit)."""
import math

import torch
import torch.nn.functional as F
from torch import nn

from training.config import ConfigError


class LoRALinear(nn.Linear):
    """A frozen Linear plus a trainable low-rank update B·A scaled by alpha / r (PEFT's LoRA).

    Subclassing Linear keeps `weight`/`bias` names, so the base checkpoint loads unchanged.
    """

    def __init__(self, in_features, out_features, *, bias: bool, rank: int, alpha: float, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # PEFT's default init; B starts at zero

    @classmethod
    def wrap(cls, linear: nn.Linear, *, rank: int, alpha: float) -> "LoRALinear":
        lora = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, rank=rank, alpha=alpha,
                   device=linear.weight.device, dtype=linear.weight.dtype)
        lora.weight = linear.weight
        if linear.bias is not None:
            lora.bias = linear.bias
        return lora

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scaling

    def merged_weight(self) -> torch.Tensor:
        return self.weight + (self.lora_B @ self.lora_A) * self.scaling


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def apply_method(model: nn.Module, method: str, *, lora_rank: int = 8, lora_alpha: float = 16.0,
                 lora_targets=("q_proj", "v_proj")) -> int:
    """Freeze what the method does not train (and add LoRA modules); return the trainable parameter count."""
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    elif method == "lora":
        unknown = sorted(set(lora_targets) - set(LORA_TARGETS))
        if unknown:
            raise ConfigError(f"--lora-targets: unknown module(s) {', '.join(unknown)}; choose from {', '.join(LORA_TARGETS)}")
        for p in model.parameters():
            p.requires_grad_(False)
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if name in lora_targets and isinstance(child, nn.Linear) and not isinstance(child, LoRALinear):
                    setattr(parent, name, LoRALinear.wrap(child, rank=lora_rank, alpha=lora_alpha))
    elif method == "last-layer":
        for p in model.parameters():
            p.requires_grad_(False)
        for module in (model.model.layers[-1], model.model.norm, model.lm_head):
            for p in module.parameters():
                p.requires_grad_(True)
    elif method == "bias":
        biases = [p for name, p in model.named_parameters() if name.endswith(".bias")]
        if not biases:
            raise ConfigError("--method bias (BitFit) needs a model with biases: its config must set attention_bias "
                              "or mlp_bias")
        for p in model.parameters():
            p.requires_grad_(False)
        for p in biases:
            p.requires_grad_(True)
    else:
        raise ConfigError(f"unknown adaptation method {method!r}")
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_state_for_peft(model: nn.Module) -> dict[str, torch.Tensor]:
    """adapter_model.safetensors keys as PEFT writes them for a causal LM."""
    state = {}
    for name, module in lora_modules(model).items():
        state[f"base_model.model.{name}.lora_A.weight"] = module.lora_A.detach().contiguous()
        state[f"base_model.model.{name}.lora_B.weight"] = module.lora_B.detach().contiguous()
    return state


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA update into its base weight and put plain Linear layers back."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                plain = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                  device=child.weight.device, dtype=child.weight.dtype)
                with torch.no_grad():
                    plain.weight.copy_(child.merged_weight())
                    if child.bias is not None:
                        plain.bias.copy_(child.bias)
                setattr(parent, name, plain)
    return model
