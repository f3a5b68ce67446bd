"""chat_eval: categorical scoring against an independent per-problem forward, sharding across ranks,
the generative path's grading (with a scripted engine and with the real one), merging of results
across runs, and ChatCORE."""

import json
from types import SimpleNamespace

import pytest
import torch

from scripts import chat_eval
from nanochat import task_eval


@pytest.fixture
def local_data(shared_data, monkeypatch):
    monkeypatch.setenv("NANOCHAT_LOCAL_DATA", str(shared_data))
    return shared_data


def _rt(rank=0, world_size=1):
    return SimpleNamespace(rank=rank, world_size=world_size, device=torch.device("cpu"), master=rank == 0)


def _model(tiny_base):
    from nanochat.checkpoint import load_model
    model, tokenizer, _ = load_model("base", "cpu", phase="eval")
    return model, tokenizer


def test_categorical_matches_independent_forward(tiny_base, local_data):
    model, tokenizer = _model(tiny_base)
    from tasks.arc import ARC
    task = ARC("ARC-Easy", "test")
    n = 10
    T = model.config.sequence_len
    expected = 0
    with torch.no_grad():
        for i in range(n):
            conv = task[i]
            ids = tokenizer.render_for_completion(conv)[-T:]
            assert ids[-1] == tokenizer.encode_special("<|assistant_start|>") or len(ids) == T
            logits = model(torch.tensor([ids]))[0, -1]
            letter_ids = [tokenizer.encode(letter)[0] for letter in conv["letters"]]
            answer = conv["letters"][max(range(len(letter_ids)), key=lambda k: logits[letter_ids[k]].item())]
            expected += answer == conv["messages"][-1]["content"]
    # batch size 3: padded batches, and a final partial one
    passed, total = task_eval.run_categorical(task, model, tokenizer, _rt(), 3, n, progress=False)
    assert (passed, total) == (expected, n)


def test_problems_are_sharded_across_ranks(tiny_base, local_data):
    model, tokenizer = _model(tiny_base)
    from tasks.mmlu import MMLU
    task = MMLU("all", "test")
    n = 9
    full = task_eval.run_categorical(task, model, tokenizer, _rt(), 4, n, progress=False)
    parts = [task_eval.run_categorical(task, model, tokenizer, _rt(r, 2), 4, n, progress=False) for r in range(2)]
    assert parts[0][1] == 5 and parts[1][1] == 4  # strided: ranks see 0,2,4,6,8 and 1,3,5,7
    assert sum(p[0] for p in parts) == full[0] and sum(p[1] for p in parts) == full[1] == n


class ScriptedEngine:
    """Stands in for nanochat.engine.Engine: replies with a fixed text per prompt."""

    def __init__(self, model, tokenizer, replies):
        self.model, self.tokenizer, self.replies, self.calls = model, tokenizer, replies, []

    def generate_batch(self, tokens, num_samples=1, **kwargs):
        self.calls.append(kwargs)
        reply = self.tokenizer.encode(self.replies[tuple(tokens)])
        return [list(tokens) + reply for _ in range(num_samples)], [[0] * len(tokens) + [1] * len(reply)] * num_samples


def test_generative_grading_with_scripted_replies(tiny_base, local_data):
    model, tokenizer = _model(tiny_base)
    from tasks.gsm8k import GSM8K
    from tasks.humaneval import HumanEval
    from tasks.common import extract_answer, last_text
    args = SimpleNamespace(num_samples=1, max_new_tokens=64, temperature=0.0, top_k=50, seed=42)
    model.config.sequence_len = 4096  # room for every prompt: this test is about grading, not context
    gsm, he = GSM8K("main", "test"), HumanEval()
    for task, right in [
        (gsm, lambda c: "Let me think.\n#### " + extract_answer(last_text(c["messages"][-1]["content"]))),
        (he, lambda c: "```python\n" + c["messages"][-1]["content"] + "\n```"),
    ]:
        convs = [task[i] for i in range(3)]
        prompts = [tuple(tokenizer.render_for_completion(c)) for c in convs]
        good = ScriptedEngine(model, tokenizer, {p: right(c) for p, c in zip(prompts, convs)})
        assert task_eval.run_generative(task, good, tokenizer, _rt(), args, 3, progress=False) == (3, 3, 0)
        assert good.calls[0] == {"max_tokens": 64, "temperature": 0.0, "top_k": 50, "seed": 42}
        bad = ScriptedEngine(model, tokenizer, {p: "#### 123456789\ndef nothing(): pass" for p in prompts})
        assert task_eval.run_generative(task, bad, tokenizer, _rt(), args, 3, progress=False) == (0, 3, 0)


def test_completion_stops_at_terminal_tokens(tiny_base):
    _, tokenizer = _model(tiny_base)
    ids = tokenizer.encode("#### 42") + [tokenizer.encode_special("<|assistant_end|>")] + tokenizer.encode(" junk")
    assert task_eval.completion_text(tokenizer, ids) == "#### 42"


def test_chat_eval_end_to_end_merges_runs_into_chatcore(tiny_base, local_data):
    first = chat_eval.main(["-i", "base", "-a", "ARC-Easy|ARC-Challenge|MMLU", "-x", "6", "--device-type=cpu",
                            "--no-progress"])
    assert sorted(first["results"]) == ["ARC-Challenge", "ARC-Easy", "MMLU"]
    assert first["chatcore"] is None
    for r in first["results"].values():
        assert r["total"] == 6 and r["baseline"] == 0.25
        assert r["centered"] == pytest.approx((r["accuracy"] - 0.25) / 0.75)
    # The generative tasks in a second run (real Engine, greedy, few tokens): results are merged.
    second = chat_eval.main(["-i", "base", "-a", "GSM8K,HumanEval,SpellingBee", "-x", "2", "-m", "8",
                             "--device-type=cpu", "--no-progress"])
    saved = json.loads((tiny_base / "report" / "chat_eval_base.json").read_text())
    assert saved["evaluated_now"] == ["GSM8K", "HumanEval", "SpellingBee"]
    assert set(saved["results"]) == set(task_eval.TASKS)
    assert saved["results"]["MMLU"] == first["results"]["MMLU"]
    for name in ("GSM8K", "HumanEval", "SpellingBee"):
        r = saved["results"][name]
        assert r["total"] == 2 and r["baseline"] == 0.0 and r["centered"] == r["accuracy"]
    # HumanEval prompts do not fit the tiny model's 128-token context: counted as failed, and said so
    assert saved["results"]["HumanEval"].get("prompt_too_long", 0) >= 1
    expected = sum(r["centered"] for r in saved["results"].values()) / 6
    assert second["chatcore"] == pytest.approx(expected) and saved["chatcore"] == pytest.approx(expected)


def test_chatcore_needs_every_task():
    results = {name: {"centered": 0.1 * k} for k, name in enumerate(task_eval.TASKS)}
    assert task_eval.chatcore(results) == pytest.approx(sum(0.1 * k for k in range(6)) / 6)
    del results["MMLU"]
    assert task_eval.chatcore(results) is None


def test_bad_flags_are_rejected():
    with pytest.raises(SystemExit):
        chat_eval.get_args(["-i", "sft", "-a", "ARC-Easy|Trivia"])
    with pytest.raises(SystemExit):
        chat_eval.get_args(["-i", "sft", "-n", "4"])  # pass@4 of greedy replies is meaningless
    with pytest.raises(SystemExit):
        chat_eval.get_args(["-i", "nope"])
    args = chat_eval.get_args(["-i", "sft", "-a", "gsm8k|humaneval"])
    assert args.tasks == ["GSM8K", "HumanEval"]
