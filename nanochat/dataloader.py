"""Pretraining data loader: tokenizes documents on the fly and packs them into rows that each start with
<|bos|> (BOS-aligned best-fit packing), sharded across torchrun ranks, resumable exactly.

Rows come from R independent *streams*, one per row of the global batch (R = rows per optimizer step).
Stream j takes the documents whose global index (across shards, row groups and epochs) is j mod R and
packs them into rows: the largest buffered document that still fits goes in; when none fits, the
shortest is cropped to fill the row exactly (no padding, every row starts at a document with <|bos|>).
A stream's rows depend only on (data, R, T), so a step's global batch is the same for any world size:
rank r of W owns streams [r*R/W, (r+1)*R/W) and reads and tokenizes only their documents; gradient
accumulation makes up the rest. A stream's state is (index of its next document, its buffer), so a
run saved with N ranks resumes on M ranks.
"""

import bisect
from collections import deque

import torch

from nanochat.dataset import list_parquet_files, open_shard, read_row_group, DataError


class _DocIndex:
    """Maps a global document index (any epoch) to (shard, row group, row) using parquet footers."""

    def __init__(self, paths):
        self.groups = []  # (path, row group, first doc index within the epoch, num docs)
        n = 0
        for path in paths:
            pf = open_shard(path)
            for rg in range(pf.num_row_groups):
                rows = pf.metadata.row_group(rg).num_rows
                if rows:
                    self.groups.append((path, rg, n, rows))
                    n += rows
        if n == 0:
            raise DataError(f"the shards {paths} contain no documents")
        self.num_docs = n
        self.starts = [g[2] for g in self.groups]

    def group_of(self, g):
        """(group number within the epoch, epoch) of global doc index g."""
        epoch, pos = divmod(g, self.num_docs)
        return bisect.bisect_right(self.starts, pos) - 1, epoch


class DataLoader:
    """Yields (inputs, targets) micro-batches of shape (B, T) on `device`; one optimizer step is
    R / (B * world_size) consecutive micro-batches. state_dict() between steps captures everything."""

    def __init__(self, tokenizer, B, T, split, rows_per_step=None, rank=0, world_size=1, device="cpu",
                 buffer_docs=32, tokenizer_threads=4, resume_states=None, data_dir=None):
        R = rows_per_step or B * world_size
        if R % (B * world_size):
            raise DataError(f"rows per step ({R}) must be a multiple of device batch {B} x world size "
                            f"{world_size}; pick a --device-batch-size that divides {R // world_size}")
        self.tok, self.B, self.T, self.R = tokenizer, B, T, R
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device)
        self.buffer_docs, self.threads = buffer_docs, tokenizer_threads
        self.bos = tokenizer.get_bos_token_id()
        self.index = _DocIndex(list_parquet_files(split, data_dir))
        per_rank = R // world_size
        self.streams = list(range(rank * per_rank, (rank + 1) * per_rank))
        self.next = {j: j for j in self.streams}          # next global doc index each stream will take
        self.buffer = {j: [] for j in self.streams}       # tokenized docs waiting to be packed
        if resume_states:
            self._load(resume_states)
        self.pending = {j: deque() for j in self.streams}  # (global index, tokens), read ahead, not state
        self.read_cursor = None                             # (group number, epoch) of the next group to read
        self._open = {}
        self._queue = deque()  # owned streams of each remaining micro-batch of the current step

    def _read_next_group(self):
        if self.read_cursor is None:  # start at the earliest document any owned stream still needs
            self.read_cursor = self.index.group_of(min(self.next.values()))
        gi, epoch = self.read_cursor
        path, rg, first, count = self.index.groups[gi]
        if path not in self._open:
            self._open = {path: open_shard(path)}  # keep just the current shard open
        texts = read_row_group(self._open[path], rg)
        base = epoch * self.index.num_docs + first
        wanted = [(base + i, text) for i, text in enumerate(texts)
                  if (base + i) % self.R in self.next and base + i >= self.next[(base + i) % self.R]]
        if wanted:
            ids = self.tok.encode([t for _, t in wanted], prepend=self.bos, num_threads=self.threads)
            for (g, _), tokens in zip(wanted, ids):
                self.pending[g % self.R].append((g, tokens))
        gi += 1
        self.read_cursor = (0, epoch + 1) if gi == len(self.index.groups) else (gi, epoch)

    def _refill(self, j):
        buf = self.buffer[j]
        while len(buf) < self.buffer_docs:
            while not self.pending[j]:
                self._read_next_group()
            g, tokens = self.pending[j].popleft()
            buf.append(tokens)
            self.next[j] = g + self.R

    def _row(self, j):
        """One row of T+1 tokens from stream j (inputs are row[:-1], targets row[1:])."""
        cap, row, buf = self.T + 1, [], self.buffer[j]
        while len(row) < cap:
            self._refill(j)
            room = cap - len(row)
            best = -1
            for i, doc in enumerate(buf):  # largest document that fits entirely
                if len(doc) <= room and (best < 0 or len(doc) > len(buf[best])):
                    best = i
            if best < 0:  # nothing fits: crop the shortest document to fill the row
                best = min(range(len(buf)), key=lambda i: len(buf[i]))
            row.extend(buf.pop(best)[:room])
        return row

    def micro_steps(self):
        return self.R // (self.B * self.world_size)

    def __iter__(self):
        return self

    def __next__(self):
        if not self._queue:
            # A cheap snapshot of every stream at the step boundary (docs are never mutated in place),
            # so an interrupted step can still be checkpointed as of its start.
            self._snapshot = {j: (self.next[j], list(self.buffer[j])) for j in self.streams}
            self._queue.extend(self.streams[a * self.B:(a + 1) * self.B] for a in range(self.micro_steps()))
        rows = torch.tensor([self._row(j) for j in self._queue.popleft()], dtype=torch.long)
        if self.device.type == "cuda":  # pin_memory() raises on CPU-only torch builds
            rows = rows.pin_memory().to(self.device, non_blocking=True)
        return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()

    def epoch(self):
        """Fractional epoch of the slowest stream (for logging)."""
        return min(self.next.values()) / self.index.num_docs

    def state_dict(self):
        """Exact position of every owned stream as of the last optimizer-step boundary."""
        snap = self._snapshot if self._queue else {j: (self.next[j], self.buffer[j]) for j in self.streams}
        return {"R": self.R, "T": self.T, "num_docs": self.index.num_docs,
                "streams": {j: {"next": nxt, "buffer": [list(d) for d in buf]} for j, (nxt, buf) in snap.items()}}

    def _load(self, states):
        """Take this rank's streams from the states saved by all ranks of a run of any world size."""
        merged = {}
        for st in states:
            if st["R"] != self.R or st["T"] != self.T:
                raise DataError(f"cannot resume the dataloader: saved with {st['R']} rows of {st['T']} tokens "
                                f"per step, now {self.R} rows of {self.T}; keep --total-batch-size and --max-seq-len")
            if st["num_docs"] != self.index.num_docs:
                raise DataError(f"cannot resume the dataloader: the training shards changed "
                                f"({st['num_docs']} documents when saved, {self.index.num_docs} now)")
            merged.update({int(j): s for j, s in st["streams"].items()})
        missing = [j for j in self.streams if j not in merged]
        if missing:
            raise DataError(f"dataloader state lacks streams {missing[:5]}...: pass every rank's loader state")
        for j in self.streams:
            self.next[j] = merged[j]["next"]
            self.buffer[j] = [list(d) for d in merged[j]["buffer"]]


def eval_batches(tokenizer, B, T, split="val", steps=1, rank=0, world_size=1, device="cpu", data_dir=None):
    """A fresh loader over the split for evaluation: the same tokens on every call and for any world size
    with the same total (steps * B * world_size rows), as every row is the first row of its own stream.
    A small packing buffer keeps the documents tokenized close to the documents evaluated."""
    loader = DataLoader(tokenizer, B, T, split, rows_per_step=steps * B * world_size, rank=rank,
                        world_size=world_size, device=device, data_dir=data_dir, buffer_docs=4)
    for _ in range(steps):
        yield next(loader)
