"""
Bits per byte: the tokenizer-independent validation metric.

Mean cross-entropy per token depends on the vocabulary (a bigger vocab packs more bytes per token), so
losses are summed in nats over tokens and divided by the number of UTF-8 bytes those tokens stand for,
taken from the raw token bytes: decoding ids to str first turns lone bytes >= 0x80 into 3-byte U+FFFD
and skews bpb. Special tokens (0 bytes) and ignored targets (-1) count neither nats nor bytes.
"""

import math

import torch
import torch.distributed as dist


@torch.no_grad()
def evaluate_bpb(model, batches, token_bytes):
    """batches: iterable of (inputs, targets). token_bytes: int tensor [vocab] on the model's device.
    Sums across torchrun ranks. Returns inf when there were no bytes at all."""
    totals = torch.zeros(2, dtype=torch.float64, device=token_bytes.device)  # nats, bytes
    for x, y in batches:
        loss = model(x, y, loss_reduction="none").reshape(-1).double()
        y = y.reshape(-1)
        b = torch.where(y >= 0, token_bytes[y.clamp(min=0)], torch.zeros_like(y)).double()
        totals += torch.stack([(loss * (b > 0)).sum(), b.sum()])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(totals)
    nats, nbytes = totals.tolist()
    return nats / (math.log(2) * nbytes) if nbytes else float("inf")
