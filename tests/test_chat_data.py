"""nanochat/chat_data.py: which targets carry loss (tool calls included), BOS-aligned best-fit packing
that never crops a conversation to fill a row, padding, truncation counts, world-size invariance and
exact resume of both batchers."""

import random

import pytest

from nanochat.chat_data import PackedBatcher, PaddedBatcher, rows_to_batch, render_row, drop_overlong
from nanochat.tokenizer import Tokenizer


from tests.conftest import list_task as ListTask


@pytest.fixture(scope="module")
def tok(shared_data):
    """A small real BPE tokenizer (with the chat special tokens), trained in a second on real prose."""
    text = (shared_data / "pretrain_text" / "llamafactory_demo" / "wiki_demo.txt").read_text(encoding="utf-8")
    return Tokenizer.train(iter([text[i:i + 10_000] for i in range(0, 400_000, 10_000)]), 1024)


def tool_conversation(i=0):
    return {"messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": f"What is {i} plus 12?"},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Let me compute: "},
            {"type": "python", "text": f"{i}+12"},
            {"type": "python_output", "text": str(i + 12)},
            {"type": "text", "text": f" so #### {i + 12}"},
        ]},
        {"role": "user", "content": "thanks"},
        {"role": "assistant", "content": "You're welcome."},
    ]}


def expected_targets(tok, i=0):
    """The tokens the model must learn to write for tool_conversation(i), built by hand: assistant text,
    the python call with its delimiters, <|assistant_end|>; never the system/user text, <|bos|>,
    <|assistant_start|> or the tool's output."""
    sp = tok.encode_special
    return (tok.encode("Let me compute: ") + [sp("<|python_start|>")] + tok.encode(f"{i}+12") + [sp("<|python_end|>")]
            + tok.encode(f" so #### {i + 12}") + [sp("<|assistant_end|>")]
            + tok.encode("You're welcome.") + [sp("<|assistant_end|>")])


def synthetic(n, seed=0):
    """Conversations of very different lengths (some longer than the rows used below)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        words = " ".join(rng.choice(["alpha", "beta", "gamma", "delta", "pi"]) for _ in range(rng.choice([2, 5, 20, 60])))
        out.append({"messages": [{"role": "user", "content": f"q{i} {words}"}, {"role": "assistant", "content": f"a{i} {words}"}]})
    return out


def loss_tokens(y):
    return [t for t in y.reshape(-1).tolist() if t >= 0]


# -----------------------------------------------------------------------------
# Masks


def test_padded_batch_trains_only_on_assistant_tokens(tok):
    task = ListTask([tool_conversation(i) for i in range(3)])
    batcher = PaddedBatcher(task, tok, B=3, T=256)
    (batches, stats) = batcher.next_step()
    (x, y), = batches
    longest = max(len(tok.render_conversation(c)[0]) for c in task)
    assert stats["conversations"] == stats["rows"] == 3 and stats["truncated"] == 0
    assert stats["row_tokens"] == 3 * longest and x.shape == (3, longest - 1)  # padded to the longest row
    assert stats["pad_tokens"] == sum(longest - len(tok.render_conversation(c)[0]) for c in task)
    for r in range(3):
        ids, _ = tok.render_conversation(task[r])
        assert x[r, :len(ids) - 1].tolist() == ids[:-1]                  # inputs: the conversation, then padding
        assert (x[r, len(ids) - 1:] == tok.get_bos_token_id()).all()
        assert loss_tokens(y[r]) == expected_targets(tok, r)           # exactly the assistant-authored tokens
        assert (y[r, len(ids) - 1:] == -1).all()                        # padding never carries loss
        # the tool output tokens are input but never targets
        out = tok.encode(str(r + 12))
        start = ids.index(tok.encode_special("<|output_start|>"))
        assert ids[start + 1:start + 1 + len(out)] == out and (y[r, start - 1:start + len(out) + 1] == -1).all()


def test_packed_batch_trains_only_on_assistant_tokens(tok):
    convs = [tool_conversation(i) for i in range(12)]
    renders = {tuple(tok.render_conversation(c)[0]): i for i, c in enumerate(convs)}
    bos = tok.get_bos_token_id()
    (x, y), = PackedBatcher(ListTask(convs), tok, B=2, T=200, buffer_size=6).next_step()[0]
    packed = 0
    for r in range(2):
        row = x[r].tolist() + [y[r, -1].item() if y[r, -1] >= 0 else bos]  # the row's T+1-th token
        starts = [k for k, t in enumerate(row) if t == bos] + [len(row)]
        want = []
        for a, b in zip(starts, starts[1:]):
            if b - a > 1:  # a conversation (a lone <|bos|> is padding)
                want += expected_targets(tok, renders[tuple(row[a:b])])
                packed += 1
        assert loss_tokens(y[r]) == want
    assert packed >= 4  # several conversations share each row


def test_gsm8k_tool_calls_masked_in_real_data(tok, shared_data, monkeypatch):
    monkeypatch.setenv("NANOCHAT_LOCAL_DATA", str(shared_data))
    from tasks.gsm8k import GSM8K
    task = GSM8K("main", "train", stop=4)
    (x, y), = PaddedBatcher(task, tok, B=4, T=1024).next_step()[0]
    sp = tok.encode_special
    for r in range(4):
        parts = task[r]["messages"][-1]["content"]
        want = []
        for part in parts:
            if part["type"] == "text":
                want += tok.encode(part["text"])
            elif part["type"] == "python":
                want += [sp("<|python_start|>")] + tok.encode(part["text"]) + [sp("<|python_end|>")]
        assert loss_tokens(y[r]) == want + [sp("<|assistant_end|>")]
        assert sp("<|output_start|>") not in loss_tokens(y[r]) and sp("<|output_start|>") in x[r].tolist()


def test_packed_rows_are_bos_aligned_and_never_crop(tok):
    T = 96
    convs = synthetic(60)
    renders = [tok.render_conversation(c)[0] for c in convs]
    full = {tuple(ids) for ids in renders}
    assert any(len(ids) > T + 1 for ids in renders) and any(len(ids) < T // 3 for ids in renders)
    batcher = PackedBatcher(ListTask(convs), tok, B=4, T=T, rows_per_step=8, buffer_size=4)
    bos = tok.get_bos_token_id()
    whole = truncated = 0
    for _ in range(4):
        batches, stats = batcher.next_step()
        truncated += stats["truncated"]
        for x, y in batches:
            assert x.shape == y.shape == (4, T)
            for r in range(4):
                row = x[r].tolist()
                assert row[0] == bos  # every row starts a conversation
                starts = [k for k, t in enumerate(row) if t == bos] + [T]
                segments = [row[a:b] for a, b in zip(starts, starts[1:])]
                content = [s for s in segments if len(s) > 1]  # a lone <|bos|> is padding
                end = sum(len(s) for s in segments[:len(content)])
                assert segments[:len(content)] == content, "padding only after the last conversation"
                assert (y[r, end:] == -1).all()
                for k, seg in enumerate(content):
                    if tuple(seg) in full:
                        whole += 1
                    elif k == len(content) - 1 and end == T:
                        # the row's last conversation may end at its extra (T+1-th) token, or be one
                        # longer than a whole row, truncated and alone in it
                        assert tuple(seg + [y[r, -1].item()]) in full or (len(content) == 1 and any(
                            len(ids) > T + 1 and ids[:T] == seg for ids in renders))
                    else:
                        raise AssertionError(f"row {r} holds a cropped conversation: {tok.decode(seg)!r}")
    assert whole > 10
    taken = [g for j in batcher.streams for g in range(j, batcher.next[j], batcher.R)]
    assert truncated == sum(len(renders[g % 60]) > T + 1 for g in taken) > 0


def test_truncation_is_counted(tok):
    long = {"messages": [{"role": "user", "content": "word " * 300}, {"role": "assistant", "content": "ok " * 300}]}
    short = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    ids, mask, cut = render_row(tok, long, 65)
    assert cut == "reply" and len(ids) == len(mask) == 65  # even the first reply does not fit
    assert render_row(tok, short, 65)[2] is None
    batcher = PaddedBatcher(ListTask([long, short]), tok, B=2, T=64)
    (x, y), = batcher.next_step()[0]
    assert batcher.state_dict()["next"] == 2
    stats = PaddedBatcher(ListTask([long, short]), tok, B=2, T=64).next_step()[1]
    assert stats["truncated"] == stats["cut_mid_reply"] == 1 and stats["conversations"] == 2
    assert x.shape == (2, 64)  # padded to the longest row (the truncated one: T+1 tokens)


def test_truncation_keeps_whole_turns(tok):
    """A multi-turn conversation too long for a row is cut after its last whole assistant turn that
    fits: every reply the model learns from still ends with <|assistant_end|>."""
    end = tok.encode_special("<|assistant_end|>")
    turns = [("user", "q one"), ("assistant", "short answer one"), ("user", "q two"), ("assistant", "two " * 10),
             ("user", "q three"), ("assistant", "three " * 200)]
    conv = {"messages": [{"role": r, "content": c} for r, c in turns]}
    full, full_mask = tok.render_conversation(conv)
    two = tok.render_conversation({"messages": conv["messages"][:4]})[0]
    ids, mask, cut = render_row(tok, conv, len(two) + 20)  # room for two whole turns, not the third
    assert cut == "turn" and ids == two and ids[-1] == end and mask == full_mask[:len(two)]
    (x, y), = PaddedBatcher(ListTask([conv]), tok, B=1, T=len(two) + 19).next_step()[0]
    assert loss_tokens(y).count(end) == 2 and loss_tokens(y)[-1] == end
    stats = PaddedBatcher(ListTask([conv]), tok, B=1, T=len(two) + 19).next_step()[1]
    assert stats["truncated"] == 1 and stats["cut_mid_reply"] == 0


def test_drop_overlong_keeps_conversations_with_a_whole_turn(tok):
    convs = synthetic(40, seed=3)
    lengths = [len(tok.render_conversation(c)[0]) for c in convs]
    kept, dropped = drop_overlong(ListTask(convs), tok, 65)
    # single-turn conversations: a long one has no whole turn that fits, so it is dropped
    assert [c for c in kept] == [c for c, n in zip(convs, lengths) if n <= 65]
    assert dropped == sum(n > 65 for n in lengths) > 0 and len(kept) + dropped == 40
    stats = PaddedBatcher(kept, tok, B=4, T=64).next_step()[1]
    assert stats["truncated"] == 0 and stats["conversations"] == 4  # every reply keeps its <|assistant_end|>


def test_fixed_length_and_rows_to_batch():
    rows = [([1, 2, 3], [0, 1, 1]), ([4, 5], [0, 0])]
    x, y = rows_to_batch(rows, pad_id=0, length=6)
    assert x.tolist() == [[1, 2, 3, 0, 0], [4, 5, 0, 0, 0]]
    assert y.tolist() == [[2, 3, -1, -1, -1], [-1, -1, -1, -1, -1]]
    with pytest.raises(ValueError, match="more than the batch length"):
        rows_to_batch(rows, pad_id=0, length=2)


# -----------------------------------------------------------------------------
# Distributed layout and resume


def all_rows(batcher_cls, tok, task, world_size, steps, **kw):
    """Concatenate every rank's rows, step by step, in rank order."""
    batchers = [batcher_cls(task, tok, rank=r, world_size=world_size, **kw) for r in range(world_size)]
    out = []
    for _ in range(steps):
        per_rank = [b.next_step()[0] for b in batchers]
        step_rows = []
        for batches in per_rank:
            for x, y in batches:
                step_rows += [(x[i].tolist(), y[i].tolist()) for i in range(x.size(0))]
        out.append(step_rows)
    return out, batchers


def strip(rows):
    # padded rows differ in width with the micro-batch grouping; compare without trailing padding
    return [(x[:len(y) - next((k for k, t in enumerate(reversed(y)) if t >= 0), len(y))], [t for t in y if t >= 0])
            for x, y in rows]


@pytest.mark.parametrize("cls", [PackedBatcher, PaddedBatcher])
def test_global_batch_is_world_size_invariant(tok, cls):
    task = ListTask(synthetic(50, seed=1))
    one, _ = all_rows(cls, tok, task, 1, 3, B=4, T=64, rows_per_step=8)
    two, _ = all_rows(cls, tok, task, 2, 3, B=2, T=64, rows_per_step=8)
    if cls is PackedBatcher:
        assert one == two
    else:
        assert [strip(s) for s in one] == [strip(s) for s in two]


@pytest.mark.parametrize("cls", [PackedBatcher, PaddedBatcher])
def test_resume_is_exact_and_world_size_free(tok, cls):
    task = ListTask(synthetic(40, seed=2))
    kw = dict(B=2, T=64, rows_per_step=4)
    reference, _ = all_rows(cls, tok, task, 1, 6, **kw)
    _, batchers = all_rows(cls, tok, task, 2, 3, **{**kw, "B": 1})
    states = [b.state_dict() for b in batchers]
    import copy
    resumed = [cls(task, tok, rank=0, world_size=1, resume_state=copy.deepcopy(states), **kw)]
    rest = []
    for _ in range(3):
        rows = []
        for x, y in resumed[0].next_step()[0]:
            rows += [(x[i].tolist(), y[i].tolist()) for i in range(x.size(0))]
        rest.append(rows)
    if cls is PackedBatcher:
        assert rest == reference[3:]
    else:
        assert [strip(s) for s in rest] == [strip(s) for s in reference[3:]]


def test_resume_refuses_a_different_layout(tok):
    task = ListTask(synthetic(20))
    state = PackedBatcher(task, tok, B=2, T=64).state_dict()
    with pytest.raises(ValueError, match="keep --total-batch-size"):
        PackedBatcher(task, tok, B=2, T=32, resume_state=state)
    with pytest.raises(ValueError, match="multiple of device batch"):
        PaddedBatcher(task, tok, B=3, T=64, rows_per_step=4)
