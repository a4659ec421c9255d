"""A Llama-architecture decoder in plain PyTorch: RMSNorm, RoPE, SwiGLU, grouped-query attention via SDPA.

Module and parameter names mirror Hugging Face's LlamaForCausalLM (model.layers.N.self_attn.q_proj …),
so a state dict is already a transformers checkpoint and any Llama checkpoint loads here. No distributed
code lives in this file.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from training.config import ModelConfig


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as transformers computes it: normalise in float32, scale in the input's dtype (so bf16 runs and exports
    agree). A float32 input takes PyTorch's own rms_norm, which computes the same thing with fewer passes and
    temporaries than the five ops written out (eager, on a CPU: ~8% of the 'small' preset's layer time, forward and
    backward; torch.compile decomposes both into the same graph)."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    normed = x.float()
    normed = normed * torch.rsqrt(normed.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def rope_tables(config: ModelConfig, seq_len: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape (seq_len, head_dim), in the rotate-half layout transformers uses."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))
    inv_freq = scaled_inv_freq(inv_freq, config.rope_scaling) if config.rope_scaling else inv_freq
    positions = torch.arange(seq_len, device=device, dtype=torch.float32)
    freqs = torch.outer(positions, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def scaled_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """RoPE frequencies stretched for a longer context, as transformers' rope_type "linear" and "llama3" (Llama 3.1+)
    compute them."""
    factor = scaling["factor"]
    if scaling["rope_type"] == "linear":
        return inv_freq / factor
    # llama3: long wavelengths slowed by factor, short ones kept, those between interpolated smoothly.
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    original = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > original / low, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= original / high) & (wavelen <= original / low)
    return torch.where(medium, smoothed, scaled)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


class HeadLoss(torch.autograd.Function):
    """The output head and the mean cross-entropy as one autograd step (training's "fused" head loss).

    The forward works out the loss's gradient with respect to the logits, (softmax - one-hot) / targets counted,
    and keeps it instead of the logits; the backward then only feeds it to the head's two matmuls and scales their
    (tokens x width) results by the incoming gradient. The plain path (logits -> float -> cross_entropy) spends a
    whole pass over the (tokens x vocab) logits in the backward doing the same arithmetic. Targets of -100 are
    ignored, as in cross_entropy. hidden (tokens, width) and weight (vocab, width) come in the matmul's dtype."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = hidden @ weight.t()
        valid = targets != -100
        safe = torch.where(valid, targets, 0)[:, None]
        scores = logits.float()
        # Written as softmax is (amax, subtract, exp, sum), not logsumexp: inductor matches exactly this shape and, on
        # a GPU, finds the max and the sum in one pass over the logits (online softmax). torch.logsumexp's
        # decomposition puts a masked_fill between the max and the subtraction, so it took two passes, plus the
        # gradient's: the kernel read the (tokens x vocab) logits three times and wrote the gradient once (13 GB, the
        # largest kernel after the matmuls and cuDNN's attention in a profile of the 124M bench on an H200).
        top = scores.amax(dim=-1, keepdim=True)
        exp = (scores - top).exp()
        sums = exp.sum(dim=-1, keepdim=True)
        lse = sums.log() + top
        count = valid.sum()
        loss = torch.where(valid, lse.squeeze(1) - scores.gather(1, safe).squeeze(1), 0.0).sum() / count
        # Pointwise only (the one-hot is a comparison, not a scatter), so torch.compile makes it one kernel with the
        # reduction, writing the gradient in the logits' dtype; eager mode holds a few float temporaries instead.
        probs = exp / sums
        hit = torch.arange(scores.size(1), device=scores.device) == safe
        grad = (torch.where(hit, probs - 1, probs) * (valid / count)[:, None]).to(logits.dtype)
        ctx.save_for_backward(grad, hidden, weight)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad, hidden, weight = ctx.saved_tensors
        grad_hidden = (grad @ weight) * grad_loss if ctx.needs_input_grad[0] else None
        grad_weight = (grad.t() @ hidden) * grad_loss if ctx.needs_input_grad[1] else None  # a frozen head: none
        return grad_hidden, grad_weight, None


class TritonHeadLoss(HeadLoss):
    """HeadLoss with the pass that turns the logits into the loss and its gradient done by training.kernels'
    Triton kernel (a torch custom op, which torch.compile calls as it is), compiled or eager. inductor's kernel for
    HeadLoss reads the logits twice from HBM; this one reads them once, the second pass coming from L2. The backward
    is HeadLoss's."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        from training.kernels import head_loss_grad  # Triton: imported only by the runs that ask for it

        logits = hidden @ weight.t()
        valid = targets != -100
        grad, row_loss = head_loss_grad(logits, torch.where(valid, targets, 0), valid / valid.sum())
        ctx.save_for_backward(grad, hidden, weight)
        return row_loss.sum()


class HeadLossInBlocks(torch.autograd.Function):
    """HeadLoss for eager mode: the same loss and gradients, worked out a block of rows at a time, all in the forward.

    Each block's logits are turned into their gradient in place and fed at once to the head's two matmuls, while the
    block is still in cache: the (tokens x vocab) logits never exist whole, and no pass over them allocates. Written
    with whole-tensor ops, HeadLoss's float temporaries made an eager CPU step 8% slower than the plain path; this
    one is faster than the plain path (head and loss, forward and backward, 'small' preset's batch on a CPU: 197
    against 247 ms). The backward only scales the two gradients kept. Under torch.compile HeadLoss is used instead:
    inductor fuses its pointwise work into one kernel, and a loop over blocks would be unrolled into the graph."""

    BLOCK_ELEMENTS = 2 * 1024 * 1024  # logits per block: 8 MB in float32, which a CPU's last-level cache holds

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # On a GPU one block: there the point is no temporaries, and a block's few kernels cost more to launch than
        # they take to run.
        rows = max(64, HeadLossInBlocks.BLOCK_ELEMENTS // weight.shape[0]) if hidden.device.type == "cpu" \
            else hidden.shape[0]
        valid = targets != -100
        count = valid.sum()
        safe = torch.where(valid, targets, 0)[:, None]
        weights = valid / count  # each row's share of the mean
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        # Summed over blocks in float32 whatever the matmul dtype, as one matmul over all rows would.
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
            if ctx.needs_input_grad[1] else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], rows):
            block = slice(start, start + rows)
            h, target, share = hidden[block], safe[block], weights[block]
            scores = (h @ weight.t()).float()  # a copy in bf16, the matmul's own output in float32
            scores.sub_(scores.amax(dim=-1, keepdim=True))
            picked = scores.gather(1, target).squeeze(1)
            scores.exp_()
            sums = scores.sum(dim=-1)
            total += (share * (sums.log() - picked)).sum()
            # (softmax - one-hot) * the row's share, in place: two passes over the block.
            scores.mul_((share / sums)[:, None])
            scores.scatter_add_(1, target, -share[:, None].to(scores.dtype))
            grad = scores.to(hidden.dtype)
            if grad_hidden is not None:
                torch.mm(grad, weight, out=grad_hidden[block])
            if grad_weight is not None:
                if grad.dtype == torch.float32:
                    grad_weight.addmm_(grad.t(), h)
                else:
                    grad_weight += (grad.t() @ h).float()
        ctx.save_for_backward(grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype))
        return total

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        return (None if grad_hidden is None else grad_hidden * grad_loss,
                None if grad_weight is None else grad_weight * grad_loss, None)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, config.num_heads * config.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, config.num_kv_heads * config.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, config.num_kv_heads * config.head_dim, bias=bias)
        self.o_proj = nn.Linear(config.num_heads * config.head_dim, config.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x.shape
        q = self.q_proj(x).view(batch, seq, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        # Rotated in the projections' own (batch, seq, heads, dim) layout, then transposed as views. Rotated after
        # the transpose, torch.compile wrote q and k out head-major, and cuDNN's attention allocates its output in
        # q's layout: y then cost a copy before o_proj, and its gradient another before the attention's backward.
        cos, sin = cos[:, None], sin[:, None]
        q = apply_rope(q, cos, sin).to(v.dtype).transpose(1, 2)
        k = apply_rope(k, cos, sin).to(v.dtype).transpose(1, 2)
        if self.num_kv_heads != self.num_heads:
            groups = self.num_heads // self.num_kv_heads
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(batch, seq, self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        bias = config.mlp_bias
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # None keeps the embedding's dtype (fp32) for the residual stream; the trainer may set bf16 (--residual-dtype).
        self.residual_dtype: torch.dtype | None = None
        # The trainer sets it (--head-loss): plain (logits, then cross_entropy); fused, the head and the loss as one
        # autograd step (HeadLoss compiled, HeadLossInBlocks eager); triton, that step with its pass over the logits a
        # Triton kernel (TritonHeadLoss).
        self.head_loss = "plain"
        cos, sin = rope_tables(config, config.max_seq_len)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.config.init_std
        # Residual projections get a depth-scaled init (GPT-2) so deep stacks start stable.
        residual_std = std / math.sqrt(2 * self.config.num_layers)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                scale = residual_std if name.endswith(("o_proj", "down_proj")) else std
                nn.init.normal_(module.weight, mean=0.0, std=scale)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """Without targets: (logits (batch, seq, vocab), None). With targets: (None, the mean cross-entropy; -100 is
        ignored). Training never reads the logits, and not returning them lets torch.compile fuse the fp32 upcast
        into the loss instead of writing the whole (batch·seq × vocab) tensor out as a graph output."""
        seq = idx.shape[1]
        if seq > self.config.max_seq_len:
            raise ValueError(f"sequence of {seq} tokens is longer than max_seq_len {self.config.max_seq_len}")
        cos, sin = self.rope_cos[:seq], self.rope_sin[:seq]
        x = self.model.embed_tokens(idx)
        if self.residual_dtype is not None:
            x = x.to(self.residual_dtype)
        for block in self.model.layers:
            x = block(x, cos, sin)
        hidden = self.model.norm(x)
        # A LoRA-wrapped head computes more than its weight: it keeps the plain path. So does a loss without a
        # backward (validation), which would only pay for the gradient HeadLoss works out.
        fused = self.head_loss != "plain" and torch.is_grad_enabled() and type(self.lm_head) is nn.Linear
        if targets is not None and fused:
            kind = hidden.device.type
            dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else hidden.dtype
            if self.head_loss == "triton":
                head_loss = TritonHeadLoss
            else:
                head_loss = HeadLoss if torch.compiler.is_compiling() else HeadLossInBlocks
            loss = head_loss.apply(hidden.reshape(-1, hidden.size(-1)).to(dtype), self.lm_head.weight.to(dtype),
                                   targets.reshape(-1))
            return None, loss
        logits = self.lm_head(hidden)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
        return None, loss

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())  # shared (tied) tensors count once

    def matmul_parameters(self) -> int:
        """N in 6N (see ModelConfig.matmul_parameters); counted from the live modules."""
        total = self.num_parameters()
        return total if self.config.tie_embeddings else total - self.model.embed_tokens.weight.numel()

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6N + 12·L·H·Q·T (ModelConfig.flops_per_token documents the form)."""
        c = self.config
        return 6.0 * self.matmul_parameters() + 12.0 * c.num_layers * c.num_heads * c.head_dim * seq_len
