"""The pretraining loader on real shards: BOS-aligned rows, world-size invariance, disjoint documents
per rank, and exact resume (same world size and N -> M ranks)."""

import pytest
import torch

from nanochat.dataloader import DataLoader
from nanochat.tokenizer import get_tokenizer

B, T, R = 2, 64, 8  # device batch, sequence length, rows per optimizer step


def take_steps(loaders, steps):
    """Global batches (inputs, targets) for `steps` optimizer steps from a list of per-rank loaders."""
    out = []
    for _ in range(steps):
        xs, ys = [], []
        for L in loaders:  # rank order = stream order
            for _ in range(L.micro_steps()):
                x, y = next(L)
                xs.append(x)
                ys.append(y)
        out.append((torch.cat(xs), torch.cat(ys)))
    return out


def loaders_for(tok, world, states=None):
    return [DataLoader(tok, B, T, "train", rows_per_step=R, rank=r, world_size=world, resume_states=states)
            for r in range(world)]


def test_rows_start_with_bos_and_targets_shift(tiny_base):
    tok = get_tokenizer()
    (x, y), = take_steps(loaders_for(tok, 1), 1)
    assert x.shape == (R, T) and y.shape == (R, T)
    assert (x[:, 0] == tok.get_bos_token_id()).all()
    assert torch.equal(x[:, 1:], y[:, :-1])
    # rows are real text: decoding them gives words, not garbage
    assert "the" in tok.decode(x[0].tolist()).lower()


@pytest.mark.parametrize("world", [2, 4])
def test_global_batch_is_identical_for_any_world_size(tiny_base, world):
    tok = get_tokenizer()
    single = take_steps(loaders_for(tok, 1), 4)
    multi = take_steps(loaders_for(tok, world), 4)
    for (x1, y1), (x2, y2) in zip(single, multi):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_ranks_read_disjoint_documents(tiny_base):
    tok = get_tokenizer()
    a, b = loaders_for(tok, 2)
    take_steps([a, b], 3)
    docs_a = {j % R for j in a.next.values()}
    docs_b = {j % R for j in b.next.values()}
    assert docs_a.isdisjoint(docs_b)  # doc index mod R identifies the stream, streams are owned by one rank


@pytest.mark.parametrize("world_before,world_after", [(1, 1), (2, 2), (2, 1), (1, 2)])
def test_resume_is_exact(tiny_base, world_before, world_after):
    tok = get_tokenizer()
    run = loaders_for(tok, world_before)
    take_steps(run, 3)
    states = [L.state_dict() for L in run]
    expected = take_steps(run, 3)
    resumed = take_steps(loaders_for(tok, world_after, states), 3)
    for (x1, y1), (x2, y2) in zip(expected, resumed):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_state_mid_step_is_the_step_start(tiny_base):
    tok = get_tokenizer()
    L = DataLoader(tok, 1, T, "train", rows_per_step=4)
    take_steps([L], 2)
    at_boundary = L.state_dict()
    next(L)  # one micro-batch into step 3
    assert L.state_dict() == at_boundary


def test_bad_batch_geometry_is_a_clear_error(tiny_base):
    with pytest.raises(ValueError, match="must be a multiple of device batch 3"):
        DataLoader(get_tokenizer(), 3, T, "train", rows_per_step=8)


def test_resume_refuses_changed_geometry(tiny_base):
    tok = get_tokenizer()
    L = DataLoader(tok, B, T, "train", rows_per_step=R)
    with pytest.raises(ValueError, match="keep --total-batch-size"):
        DataLoader(tok, B, T * 2, "train", rows_per_step=R, resume_states=[L.state_dict()])
