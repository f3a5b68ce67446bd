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
    nats = torch.zeros((), dtype=torch.float64, device=token_bytes.device)
    nbytes = torch.zeros((), dtype=torch.float64, device=token_bytes.device)
    for x, y in batches:
        loss = model(x, y, loss_reduction="none").reshape(-1).double()
        y = y.reshape(-1)
        b = torch.where(y >= 0, token_bytes[y.clamp(min=0)], torch.zeros_like(y)).double()
        nats += (loss * (b > 0)).sum()
        nbytes += b.sum()
    if dist.is_available() and dist.is_initialized():
        pair = torch.stack([nats, nbytes])
        dist.all_reduce(pair)
        nats, nbytes = pair[0], pair[1]
    return nats.item() / (math.log(2) * nbytes.item()) if nbytes.item() else float("inf")
