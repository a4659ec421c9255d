"""Triton kernels for CUDA training, each behind a torch custom op, so torch.compile calls it as one opaque kernel.

Imported only when a run asks for one (--head-loss triton): CUDA builds of torch bring Triton; a CPU install may not
have it. TRITON_INTERPRET=1, set before this module is imported, runs the same kernels on a CPU through Triton's
interpreter, which is how the CPU tests check them.
"""
import os

import torch
import triton
import triton.language as tl

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _head_loss_rows(logits, grad, row_loss, targets, shares, rows, vocab, BLOCK: tl.constexpr,
                    PER_SM: tl.constexpr):  # programs per SM (0: one per row), read by the launch grid only
    """For each row of logits: the mean cross-entropy's share (lse - the target's logit) * share, and its gradient
    (softmax - one-hot) * share, written in the logits' dtype. share is 1/targets counted, 0 for an ignored row.

    Two passes over the row: the max and the sum of exps together (online softmax, a running max per lane), then the
    gradient. The programs are persistent, a few per SM, each taking rows in turn: the rows being worked on at once
    (a few hundred of 100 KB, for a vocabulary of 50,304 in bf16) fit in L2, so the second pass reads from there and
    HBM sees the logits once and the gradient once. inductor's kernel for the same arithmetic launches a program per
    row, and as many run at once as fit, so the second pass mostly goes back to HBM."""
    cols = tl.arange(0, BLOCK)
    for row in range(tl.program_id(0), rows, tl.num_programs(0)):
        start_of_row = tl.cast(row, tl.int64) * vocab  # past 2**31 logits in all, int32 offsets overflow
        top = tl.full([BLOCK], float("-inf"), tl.float32)
        total = tl.zeros([BLOCK], tl.float32)
        for start in range(0, vocab, BLOCK):
            x = tl.load(logits + start_of_row + start + cols, mask=start + cols < vocab, other=float("-inf"),
                        eviction_policy="evict_last").to(tl.float32)
            new_top = tl.maximum(top, x)
            # A lane past the end of a short row holds -inf only: shifting by 0 there keeps exp(-inf - -inf) = NaN
            # out of its (zero) sum.
            shift = tl.where(new_top == float("-inf"), 0.0, new_top)
            total = total * tl.exp(top - shift) + tl.exp(x - shift)
            top = new_top
        best = tl.max(top, 0)
        lse = tl.log(tl.sum(total * tl.exp(top - best), 0)) + best
        target = tl.load(targets + row)
        share = tl.load(shares + row)
        picked = tl.load(logits + start_of_row + target, mask=share != 0.0, other=0.0).to(tl.float32)
        tl.store(row_loss + row, tl.where(share != 0.0, (lse - picked) * share, 0.0))
        for start in range(0, vocab, BLOCK):
            offsets = start + cols
            inside = offsets < vocab
            x = tl.load(logits + start_of_row + offsets, mask=inside, other=0.0,
                        eviction_policy="evict_first").to(tl.float32)
            g = tl.exp(x - lse) * share
            g = tl.where(offsets == target, g - share, g)
            tl.store(grad + start_of_row + offsets, g.to(grad.dtype.element_ty), mask=inside,
                     eviction_policy="evict_first")  # read by the backward's matmuls, long after: not worth L2


# Block width, warps and programs per SM, picked by timing on the first call for each shape (so a new process may
# pick another, which sums in another order: its losses differ from the last process's in the 7th digit). A persistent
# grid must fit on the GPU at once, or a program waiting for a slot waits for another's whole share of rows: maxnreg
# holds each config to its share of an SM's 64K registers (ptxas gives 39 to 76 a thread for bf16 or fp32 on sm_90,
# so none spills), and each stays within 2,048 threads an SM. Each keeps 16 to 32 KB of loads in flight per SM; the
# rows in flight are 13 to 53 MB in bf16 (twice that in fp32), against an L2 of 50 MB on an H100 or H200. PER_SM 0 is a
# program per row, as inductor launches it, for comparison.
def _config(block: int, warps: int, per_sm: int) -> triton.Config:
    registers = 65536 // (32 * warps * per_sm) // 8 * 8 if per_sm else None
    return triton.Config({"BLOCK": block, "PER_SM": per_sm}, num_warps=warps, maxnreg=registers)


_CONFIGS = [_config(16384, 32, 1), _config(8192, 16, 2), _config(4096, 8, 3), _config(4096, 16, 3),
            _config(4096, 8, 4), _config(2048, 8, 0)]
_head_loss_rows_tuned = triton.autotune(configs=_CONFIGS, key=["rows", "vocab"])(_head_loss_rows)

# The interpreter has no SMs and nothing to time: a fixed small block, and fewer programs than rows, so the tests
# take the persistent loop.
INTERPRETED_BLOCK, INTERPRETED_PROGRAMS = 256, 3


@torch.library.custom_op("gatehouse::head_loss_grad", mutates_args=())
def head_loss_grad(logits: torch.Tensor, targets: torch.Tensor, shares: torch.Tensor) -> tuple[torch.Tensor,
                                                                                               torch.Tensor]:
    """logits (rows, vocab); targets (rows,) int64, in [0, vocab) where the share is not 0 (an ignored row's target
    is not read); shares (rows,) float32, 0 for an ignored row. Returns the gradient of sum(row losses) with respect to
    the logits, in their dtype, and the row losses (float32): their sum is the mean cross-entropy."""
    rows, vocab = logits.shape
    logits, targets, shares = logits.contiguous(), targets.contiguous(), shares.float().contiguous()
    grad = torch.empty_like(logits)
    row_loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows == 0:
        return grad, row_loss
    if INTERPRETED:
        _head_loss_rows[(min(rows, INTERPRETED_PROGRAMS),)](logits, grad, row_loss, targets, shares, rows, vocab,
                                                          BLOCK=INTERPRETED_BLOCK, PER_SM=1)
    else:
        sms = torch.cuda.get_device_properties(logits.device).multi_processor_count
        _head_loss_rows_tuned[lambda meta: (min(rows, sms * meta["PER_SM"]) if meta["PER_SM"] else rows,)](
            logits, grad, row_loss, targets, shares, rows, vocab)
    return grad, row_loss


@head_loss_grad.register_fake
def _(logits: torch.Tensor, targets: torch.Tensor, shares: torch.Tensor):
    return (torch.empty_like(logits, memory_format=torch.contiguous_format),
            logits.new_empty(logits.shape[0], dtype=torch.float32))
