"""
Batches of conversations for midtraining, SFT and RL, rendered through tokenizer.render_conversation
(the one chat format and loss mask): position i's target ids[i+1] is kept where mask[i+1] == 1
(assistant text, its python tool calls, <|assistant_end|>), else -1 (user turns, <|bos|>,
<|assistant_start|>, tool output, padding). Two batchers, one interface: next_step() -> (this rank's
micro-batches, its stats), state_dict(), resume_state=. State is indices and counters, never tokens, so
a state saved by N ranks resumes on M (buffered conversations are re-rendered, deterministically).
"""

import torch

from tasks.common import Task


def render_row(tokenizer, conversation, capacity):
    """(ids, mask, cut) of the conversation fitted to `capacity` tokens: cut None (it fits), "turn"
    (after its last whole assistant turn that fits, so every reply kept ends with <|assistant_end|>), or
    "reply" (cut inside its first reply, a reply that never ends: count these, or drop_overlong them)."""
    ids, mask = tokenizer.render_conversation(conversation)
    if len(ids) <= capacity:
        return ids, mask, None
    end = tokenizer.encode_special("<|assistant_end|>")
    for i in range(capacity - 1, 0, -1):
        if ids[i] == end and mask[i]:
            return ids[:i + 1], mask[:i + 1], "turn"
    return ids[:capacity], mask[:capacity], "reply"


def rows_to_batch(rows, pad_id, length=None, device="cpu"):
    """rows: [(ids, mask)] of lengths >= 2 -> (inputs, targets), (len(rows), L - 1) each, L = `length` or
    the longest row; targets[i] = ids[i+1] where mask[i+1] else -1, and padding (pad_id) is -1."""
    L = length or max(len(ids) for ids, _ in rows)
    ids_t = torch.full((len(rows), L), pad_id, dtype=torch.long)
    keep = torch.zeros((len(rows), L), dtype=torch.bool)
    for r, (ids, mask) in enumerate(rows):
        if len(ids) > L:
            raise ValueError(f"row {r} has {len(ids)} tokens, more than the batch length {L}")
        ids_t[r, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        keep[r, :len(mask)] = torch.tensor(mask, dtype=torch.bool)
    inputs = ids_t[:, :-1]
    targets = torch.where(keep[:, 1:], ids_t[:, 1:], torch.full_like(ids_t[:, 1:], -1))
    if torch.device(device).type == "cuda":  # pinning memory needs CUDA: on CPU-only torch pin_memory() crashes
        return (inputs.pin_memory().to(device, non_blocking=True),
                targets.pin_memory().to(device, non_blocking=True))
    return inputs.contiguous().to(device), targets.contiguous().to(device)


def new_stats():
    """A step's counters (summed across ranks by the training loop): conversations taken, truncated
    (cut_mid_reply: inside their first reply), rows built, their tokens, of which padding."""
    return {"conversations": 0, "truncated": 0, "cut_mid_reply": 0, "rows": 0, "row_tokens": 0, "pad_tokens": 0}


class _Subset(Task):
    """The conversations of `task` whose indices are `rows`."""
    def __init__(self, task, rows):
        super().__init__()
        self.task, self.rows = task, rows

    def get_example(self, index):
        return self.task[self.rows[index]]


def drop_overlong(task, tokenizer, capacity):
    """(conversations of `task` whose first reply fits in `capacity` tokens, how many were dropped). For
    a short context: a reply cut inside never shows its <|assistant_end|>, and many of them teach the
    model to talk until the context is full. Renders every conversation once."""
    keep = [i for i in range(len(task)) if render_row(tokenizer, task[i], capacity)[2] != "reply"]
    return _Subset(task, keep), len(task) - len(keep)


class _Batcher:
    """Shared: the mixture, the shapes, this rank's row slots of a step's R, the resume-state check."""
    def __init__(self, dataset, tokenizer, B, T, rows_per_step, rank, world_size, device):
        if len(dataset) == 0:
            raise ValueError(f"{type(self).__name__}: the conversation mixture is empty")
        self.R = rows_per_step or B * world_size
        if B < 1 or self.R % (B * world_size):
            raise ValueError(f"rows per step ({self.R}) must be a multiple of device batch {B} x world size "
                             f"{world_size}; pick a --device-batch-size that divides {self.R // max(world_size, 1)}")
        self.dataset, self.tok, self.B, self.T, self.device = dataset, tokenizer, B, T, device
        self.N, self.bos = len(dataset), tokenizer.get_bos_token_id()
        self.streams = list(range(rank * self.R // world_size, (rank + 1) * self.R // world_size))

    def _check_state(self, st):
        if (st.get("kind"), st["R"], st["T"], st["N"]) != (self.kind, self.R, self.T, self.N):
            raise ValueError(f"cannot resume the {self.kind} batcher: saved with {st['R']} rows per step of at most "
                             f"{st['T']}+1 tokens over {st['N']} conversations, now {self.R}, {self.T}, {self.N}; "
                             f"keep --total-batch-size, --max-seq-len and the mixture flags")

    def _render(self, g, stats):
        """Mixture index g (of any epoch) as (ids, mask) of at most T+1 tokens, counted in `stats`."""
        ids, mask, cut = render_row(self.tok, self.dataset[g % self.N], self.T + 1)
        stats["conversations"] += 1
        stats["truncated"] += cut is not None
        stats["cut_mid_reply"] += cut == "reply"
        return ids, mask

    def next_step(self):
        """([(inputs, targets)] for each micro-batch of this rank in the next step, stats)."""
        stats, batches = new_stats(), []
        for a in range(0, len(self.streams), self.B):
            rows = [self._row(j, stats) for j in self.streams[a:a + self.B]]
            L = self.T + 1 if self.fixed_length else max(len(ids) for ids, _ in rows)
            stats["rows"] += len(rows)
            stats["row_tokens"] += L * len(rows)
            stats["pad_tokens"] += sum(L - len(ids) for ids, _ in rows)
            batches.append(rows_to_batch(rows, self.bos, L, self.device))
        return batches, stats


class PackedBatcher(_Batcher):
    """Midtraining: rows of T+1 tokens, BOS-aligned best fit (each row takes the largest buffered conversation
    that still fits, then pads). A conversation is never cropped to fill a row (that would train on replies cut
    mid-way); only one longer than a row is truncated, and counted. As in dataloader.py, stream j of the R rows
    per step takes conversations j, j+R, ..., so the global batch does not depend on the number of ranks."""
    kind, fixed_length = "packed", True

    def __init__(self, dataset, tokenizer, B, T, rows_per_step=None, rank=0, world_size=1, device="cpu",
                 buffer_size=16, resume_state=None):
        super().__init__(dataset, tokenizer, B, T, rows_per_step, rank, world_size, device)
        self.buffer_size = buffer_size
        self.next = {j: j for j in self.streams}       # next mixture index (any epoch) stream j takes
        self.buffer = {j: [] for j in self.streams}    # mixture indices taken but not yet packed
        self._rendered = {}                            # mixture index -> (ids, mask), buffered ones only
        if resume_state is not None:
            self._load(resume_state)

    def _row(self, j, stats):
        """Stream j's next row, unpadded: rows_to_batch pads it with BOS and no loss."""
        ids, mask, buf = [], [], self.buffer[j]
        while True:
            while len(buf) < self.buffer_size:  # keep the buffer full so best fit has a choice
                g = self.next[j]
                self._rendered[g] = self._render(g, stats)
                buf.append(g)
                self.next[j] = g + self.R
            room = self.T + 1 - len(ids)
            fits = [g for g in buf if len(self._rendered[g][0]) <= room]
            if not fits:
                return ids, mask
            best = max(fits, key=lambda g: len(self._rendered[g][0]))  # the first of the longest
            buf.remove(best)
            a, m = self._rendered.pop(best)
            ids, mask = ids + a, mask + m

    def state_dict(self):
        return {"kind": "packed", "R": self.R, "T": self.T, "N": self.N,
                "streams": {j: {"next": self.next[j], "buffer": list(self.buffer[j])} for j in self.streams}}

    def _load(self, states):
        """Take this rank's streams from the states saved by every rank of a run of any world size."""
        merged = {}
        for st in states if isinstance(states, list) else [states]:
            self._check_state(st)
            merged.update({int(j): s for j, s in st["streams"].items()})
        missing = [j for j in self.streams if j not in merged]
        if missing:
            raise ValueError(f"packed batcher state lacks streams {missing[:5]}: pass every rank's loader state")
        scratch = new_stats()
        for j in self.streams:
            self.next[j] = merged[j]["next"]
            self.buffer[j] = list(merged[j]["buffer"])
            for g in self.buffer[j]:
                self._rendered[g] = self._render(g, scratch)  # counted when first taken


class PaddedBatcher(_Batcher):
    """SFT: one conversation per row of at most T+1 tokens (longer ones truncated, see render_row, and counted),
    padded to the micro-batch's longest row, or to T+1 with fixed_length=True (one shape for torch.compile);
    step s takes conversations [s*R, (s+1)*R), split across ranks."""
    kind = "padded"

    def __init__(self, dataset, tokenizer, B, T, rows_per_step=None, rank=0, world_size=1, device="cpu",
                 fixed_length=False, resume_state=None):
        super().__init__(dataset, tokenizer, B, T, rows_per_step, rank, world_size, device)
        self.fixed_length, self.next = fixed_length, 0  # next: mixture index of the next step's first row
        if resume_state is not None:
            st = resume_state[0] if isinstance(resume_state, list) else resume_state
            self._check_state(st)
            self.next = st["next"]

    def _row(self, k, stats):
        return self._render(self.next + k, stats)

    def next_step(self):
        step = super().next_step()
        self.next += self.R
        return step

    def state_dict(self):
        return {"kind": "padded", "R": self.R, "T": self.T, "N": self.N, "next": self.next}
