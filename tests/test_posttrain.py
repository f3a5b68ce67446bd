"""Post-training on the tiny real pipeline: mid_train -> chat_sft -> chat_rl from the d2 base checkpoint,
their checkpoints and reports, exact resume, the loss normalisation (an all-masked micro-batch adds
zero, never NaN), the policy-gradient loss against a reference, the LR schedules at their edges
(a schedule that ramps up to 1 where it should decay is an easy slip), clear errors, and 2 ranks under torchrun matching one process."""

import json

import pytest
import torch
import torch.nn.functional as F

from nanochat.common import UserError
from nanochat.gpt import GPTConfig, build_model

# GSM8K (python tool calls), Identity and SpellingBee only: the big chat and multiple-choice sets take
# longer to load than these runs take to train.
SMALL = ["--max-seq-len=128", "--device-batch-size=2", "--total-batch-size=512", "--smoltalk-size=0",
         "--mmlu-epochs=0", "--arc-epochs=0", "--identity-size=20", "--spelling-size=40", "--eval-tokens=256",
         "--val-size=16", "--compile=off", "--eval-every=-1"]
RL = ["--source=base", "--task=spellingbee", "--spelling-size=50", "--examples-per-step=2", "--num-samples=3",
      "--max-new-tokens=12", "--eval-examples=2", "--device-batch-size=4", "--save-every=-1", "--init-lr-frac=1"]


@pytest.fixture
def chat_env(tiny_base, shared_data, monkeypatch):
    """The tiny base dir with task data from ../shared/data and exact fp32 math (for resume equality)."""
    monkeypatch.setenv("NANOCHAT_LOCAL_DATA", str(shared_data))
    monkeypatch.setenv("NANOCHAT_DTYPE", "float32")
    return tiny_base


def read_report(base, stage):
    with open(base / "report" / f"{stage}.json") as f:
        return json.load(f)


def checkpoint(stage, tag, step=None):
    from nanochat.checkpoint import resolve_checkpoint, load_checkpoint
    d, s = resolve_checkpoint(stage, tag, step)
    state, meta, _, _ = load_checkpoint(d, s)
    return state, meta


def small_model(seed=0):
    torch.manual_seed(seed)
    cfg = GPTConfig(sequence_len=32, vocab_size=50, n_layer=2, n_head=2, n_kv_head=2, n_embd=16)
    m = build_model(cfg, "cpu")
    with torch.no_grad():  # break the zero-init output projections so every weight gets a gradient
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


# -----------------------------------------------------------------------------
# Loss normalisation and schedules


def test_all_masked_micro_batch_gives_zero_loss_and_gradient():
    from nanochat.finetune import masked_backward
    m = small_model()
    x = torch.randint(0, 50, (2, 12))
    y = torch.full((2, 12), -1)
    for reduction in ("sum", "mean"):
        loss = m(x, y, loss_reduction=reduction)
        loss.backward()
        assert torch.isfinite(loss) and loss.item() == 0.0
        assert all(p.grad is None or (p.grad == 0).all() for p in m.parameters())
        m.zero_grad(set_to_none=True)
    loss_sum = masked_backward(m, [(x, y)], 1.0 / max(0, 1))
    assert loss_sum.item() == 0.0 and all(p.grad is None or (p.grad == 0).all() for p in m.parameters())


def test_step_loss_is_the_mean_over_all_assistant_tokens_of_the_step():
    """Micro-batches with 1, 0 and many targets: the accumulated gradient equals that of the mean over
    the step's targets computed in one batch (so a near-empty micro-batch is not over-weighted)."""
    from nanochat.finetune import masked_backward
    m = small_model()
    g = torch.Generator().manual_seed(0)
    xs = [torch.randint(0, 50, (2, 10), generator=g) for _ in range(3)]
    ys = [torch.randint(0, 50, (2, 10), generator=g) for _ in range(3)]
    ys[0][:] = -1
    ys[0][1, 3] = 7        # one target
    ys[1][:] = -1          # none
    ys[2][0, :4] = -1      # most
    n = sum(int((y >= 0).sum()) for y in ys)
    loss_sum = masked_backward(m, list(zip(xs, ys)), 1.0 / n)
    ours = [p.grad.clone() for p in m.parameters()]
    m.zero_grad(set_to_none=True)
    ref = m(torch.cat(xs), torch.cat(ys))  # 'mean' over every non-ignored target of the step
    ref.backward()
    assert abs(loss_sum.item() / n - ref.item()) < 1e-5
    for a, p in zip(ours, m.parameters()):
        assert torch.allclose(a, p.grad, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("stage", ["mid", "sft"])
def test_lr_schedule_decays_down_at_the_end(stage):
    from nanochat.finetune import get_args, lr_schedule
    args = get_args(stage, [])
    flat_until = 1 - args.warmdown_ratio
    assert lr_schedule(0.0, args) == 1.0
    assert lr_schedule(flat_until / 2, args) == 1.0
    assert lr_schedule(flat_until - 0.01, args) == 1.0
    assert 0 < lr_schedule(flat_until + args.warmdown_ratio / 2, args) < 1
    assert lr_schedule(0.9999, args) == pytest.approx(args.final_lr_frac, abs=1e-9)
    values = [lr_schedule(k / 500, args) for k in range(500)]
    assert all(b <= a for a, b in zip(values, values[1:]))  # never ramps up: decays, as a warmdown should


def test_policy_gradient_matches_reference():
    from scripts.chat_rl import policy_gradient_backward
    m = small_model(1)
    g = torch.Generator().manual_seed(1)
    rows, advantages = [], [0.5, -0.5, 0.0, 1.0]
    for k, adv in enumerate(advantages):
        n_prompt, n_new = 4 + k, 6 - k
        ids = torch.randint(0, 50, (n_prompt + n_new,), generator=g).tolist()
        mask = [0] * n_prompt + [1] * n_new
        mask[n_prompt + 1] = 0  # a forced tool-output token: never trained
        rows.append((ids, mask))
    n_tokens = sum(sum(mk) for _, mk in rows)
    loss = policy_gradient_backward(m, rows, advantages, 1.0 / n_tokens, 3, 0, "cpu")
    ours = [p.grad.clone() for p in m.parameters()]
    m.zero_grad(set_to_none=True)
    # reference: -sum_r adv_r sum_{sampled i} log p(ids_i | ids_<i) / n, one sequence at a time
    ref = 0.0
    for (ids, mask), adv in zip(rows, advantages):
        logp = F.log_softmax(m(torch.tensor([ids[:-1]]))[0], dim=-1)
        chosen = logp.gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
        ref = ref - adv * (chosen * torch.tensor(mask[1:], dtype=torch.float32)).sum() / n_tokens
    ref.backward()
    assert abs(loss - ref.item()) < 1e-5
    for a, p in zip(ours, m.parameters()):
        assert torch.allclose(a, p.grad, atol=1e-6, rtol=1e-4)
    # a small step along the negative gradient makes the rewarded reply likelier, the penalised one less
    with torch.no_grad():
        before = [m(torch.tensor([ids[:-1]]), torch.tensor([ids[1:]]), loss_reduction="sum").item() for ids, _ in rows]
        for a, p in zip(ours, m.parameters()):
            p -= 0.5 * a
        after = [m(torch.tensor([ids[:-1]]), torch.tensor([ids[1:]]), loss_reduction="sum").item() for ids, _ in rows]
    assert after[3] < before[3] and after[1] > before[1]


class StreamingEngine:
    """Stands in for nanochat.engine.Engine.generate: streams a scripted reply per prompt, one token
    column at a time, stopping after a terminal token or max_tokens (as the real one does)."""

    def __init__(self, replies, terminals):
        self.replies, self.terminals, self.calls = replies, terminals, []

    def generate(self, tokens, num_samples=1, max_tokens=None, temperature=1.0, top_k=None, seed=42):
        self.calls.append((tuple(tokens), max_tokens, temperature, seed))
        for t in self.replies[tuple(tokens)][:max_tokens]:
            yield [t] * num_samples, [1] * num_samples
            if t in self.terminals:
                return


def test_turn_end_rate_counts_replies_that_end_with_assistant_end():
    from types import SimpleNamespace
    from nanochat.task_eval import turn_end_rate
    END, BOS = 5, 0
    tok = SimpleNamespace(encode_special=lambda s: {"<|assistant_end|>": END}[s])
    replies = {(1,): [7, 8, END, 9],      # ends its turn
               (2,): [7, 7, 7, 7, 7],     # runs out of budget
               (3,): [7, BOS],            # a <|bos|> is not a proper end of turn
               (4,): [7, 7, 7, END]}      # ends, but only on its 4th token
    engine = StreamingEngine(replies, {END, BOS})
    prompts = [[1], [2], [3], [4]]
    rt = lambda r, w: SimpleNamespace(rank=r, world_size=w, device=torch.device("cpu"))
    assert turn_end_rate(engine, tok, rt(0, 1), prompts) == (2, 4)
    assert [(t, seed) for _, _, t, seed in engine.calls] == [(0.0, 42 + i) for i in range(4)]  # greedy by default
    assert turn_end_rate(engine, tok, rt(0, 1), prompts, max_new_tokens=3) == (1, 4)
    # strided over ranks (without a process group each rank reports its own share)
    assert [turn_end_rate(engine, tok, rt(r, 2), prompts) for r in range(2)] == [(1, 2), (1, 2)]


# -----------------------------------------------------------------------------
# The scripts end to end


def test_mid_then_sft_then_rl(chat_env, monkeypatch, capsys):
    from scripts import mid_train, chat_sft, chat_rl
    from nanochat.checkpoint import load_model
    mid_train.main([*SMALL, "--num-iterations=3"])
    r = read_report(chat_env, "mid_train")
    base_state, base_meta = checkpoint("base", "d2")
    state, meta = checkpoint("mid", "d2")
    assert r["step"] == 3 and len(r["losses"]) == 3 and all(x == x for x in r["losses"])
    assert r["parent"]["source"] == "base" and r["parent"]["step"] == base_meta["step"]
    assert r["val_loss"] is not None and r["truncated_conversations"] >= 0 and r["conversations"] > 0
    # the full model config travels with every checkpoint (a loader that defaults a missing
    # window_pattern would rebuild another model); settings are inherited
    assert meta["model_config"] == base_meta["model_config"] and meta["stage"] == "mid"
    assert meta["train_args"]["max_seq_len"] == 128 and meta["train_args"]["matrix_lr"] == base_meta["train_args"]["matrix_lr"]
    assert any(not torch.equal(state[k], base_state[k]) for k in state)  # it trained

    chat_sft.main([*SMALL, "--num-iterations=2", "--chat-eval-examples=2", "--overlong=drop"])  # default source: mid
    r = read_report(chat_env, "chat_sft")
    assert r["parent"]["source"] == "mid" and r["step"] == 2 and r["stage"] == "sft"
    assert r["mixture"]["dropped_overlong"] > 0 and r["cut_mid_reply_conversations"] == 0
    assert r["train_conversations"] == sum(v for k, v in r["mixture"].items() if k != "dropped_overlong") - r["mixture"]["dropped_overlong"]
    # generation checks before/after: 2 held-out prompts (no SmolTalk: from the validation mixture)
    assert [e["step"] for e in r["chat_evals"]] == [0, 2]
    assert all(e["turn_end_prompts"] == 2 and e["spelling_count_problems"] == 2 for e in r["chat_evals"])
    assert 0 <= r["turn_end_after"] <= 1 and 0 <= r["spelling_count_after"] <= 1
    assert set(r["mixture"]) == {"GSM8K train x1", "Identity", "SpellingBee train", "dropped_overlong"}
    model, tok, meta = load_model("sft", "cpu", model_tag="d2")  # consumers load it like any checkpoint
    assert meta["loop_state"]["step"] == 2

    # RL: the tiny model never gets a letter count right, so grade replies by length parity instead;
    # that gives non-zero advantages and real updates (the real grading is tested in test_tasks).
    from tasks.spellingbee import SpellingBee
    monkeypatch.setattr(SpellingBee, "reward", lambda self, conversation, completion: float(len(completion) % 2))
    capsys.readouterr()
    chat_rl.main([*RL[1:], "--num-iterations=2"])  # default source: sft
    assert "Optimizer moments" not in capsys.readouterr().out  # RL starts with fresh moments, SFT's are not reused
    r = read_report(chat_env, "chat_rl")
    assert r["parent"]["source"] == "sft" and r["step"] == 2 and len(r["rewards"]) == 2
    assert r["pass1_before"] is not None and r["pass1_after"] is not None and r["skipped_steps"] < 2
    assert len(r["pass1_history"]) == 2
    state, meta = checkpoint("rl", "d2")
    assert meta["model_config"] == base_meta["model_config"]


@pytest.mark.parametrize("script", ["mid_train", "chat_sft"])
def test_resume_continues_exactly(chat_env, script):
    import importlib
    main = importlib.import_module(f"scripts.{script}").main
    stage = "mid" if script == "mid_train" else "sft"
    common = [*SMALL, "--source=base", "--num-iterations=3", "--model-tag=d2"]
    main([*common, "--output-tag=straight"])
    main([*common, "--output-tag=resumed", "--max-steps-this-run=1"])
    assert checkpoint(stage, "resumed")[1]["loop_state"]["step"] == 1
    main(["--resume", "--output-tag=resumed", "--compile=off"])
    a, ma = checkpoint(stage, "straight")
    b, mb = checkpoint(stage, "resumed")
    assert ma["step"] == mb["step"] == 3
    assert ma["loop_state"]["losses"] == mb["loop_state"]["losses"]
    assert ma["loop_state"]["data"] == mb["loop_state"]["data"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])  # the engine runs the model itself / a bf16 copy
def test_rl_resume_continues_exactly(chat_env, monkeypatch, dtype):
    from scripts import chat_rl
    monkeypatch.setenv("NANOCHAT_DTYPE", dtype)
    from tasks.spellingbee import SpellingBee
    monkeypatch.setattr(SpellingBee, "reward", lambda self, conversation, completion: float(len(completion) % 2))
    chat_rl.main([*RL, "--num-iterations=2", "--output-tag=straight", "--eval-every=-1"])
    chat_rl.main([*RL, "--num-iterations=2", "--output-tag=resumed", "--max-steps-this-run=1", "--eval-every=-1"])
    chat_rl.main(["--resume", "--output-tag=resumed"])
    a, ma = checkpoint("rl", "straight")
    b, mb = checkpoint("rl", "resumed")
    assert ma["loop_state"]["rewards"] == mb["loop_state"]["rewards"]
    assert ma["loop_state"]["skipped_steps"] < 2 and ma["step"] == mb["step"] == 2
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_clear_errors(chat_env, tmp_path):
    from scripts import chat_sft, mid_train
    bad = tmp_path / "mine.jsonl"
    bad.write_text('[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]\n{"oops": 1}\n')
    with pytest.raises(UserError, match=f"{bad}:2: an object line needs a 'messages' list"):
        mid_train.main([*SMALL, "--num-iterations=1", f"--custom-json={bad}"])
    with pytest.raises(UserError, match="no mid checkpoints"):
        chat_sft.main([*SMALL, "--num-iterations=1"])  # default source is mid: none trained yet
    with pytest.raises(UserError, match="device batch sizes that divide"):
        mid_train.main([*SMALL, "--num-iterations=1", "--device-batch-size=3"])
    with pytest.raises(UserError, match="no sft checkpoints"):
        chat_sft.main(["--resume"])


def test_custom_json_joins_the_mixture(chat_env, tmp_path):
    from scripts import chat_sft
    good = tmp_path / "mine.jsonl"
    good.write_text("".join(json.dumps([{"role": "user", "content": f"ping {i}"}, {"role": "assistant", "content": "pong"}]) + "\n"
                            for i in range(10)))
    chat_sft.main(["--source=base", "--max-seq-len=128", "--device-batch-size=2", "--total-batch-size=256",
                   "--smoltalk-size=0", "--arc-epochs=0", "--gsm8k-epochs=0", "--identity-size=0", "--spelling-size=0",
                   f"--custom-json={good}", "--eval-tokens=256", "--compile=off", "--eval-every=-1"])
    r = read_report(chat_env, "chat_sft")
    assert r["mixture"][f"CustomJSON {good}"] == 10 and r["train_conversations"] == 10
    assert r["step"] == 5  # one epoch: 10 conversations, 2 per step
    assert "note_val" in r["mixture"]
    # midtraining's epoch is counted in conversations taken by the packer (its buffers fill at once here)
    from scripts import mid_train
    mid_train.main(["--max-seq-len=128", "--device-batch-size=2", "--total-batch-size=256", "--smoltalk-size=0",
                    "--mmlu-epochs=0", "--arc-epochs=0", "--gsm8k-epochs=0", "--identity-size=0", "--spelling-size=0",
                    f"--custom-json={good}", "--eval-tokens=256", "--compile=off", "--eval-every=-1"])
    r = read_report(chat_env, "mid_train")
    assert r["num_iterations"] is None and r["epochs"] >= 1 and r["step"] == 1


def test_smoltalk_max_tokens_drops_long_chats_only(chat_env, capsys):
    """--smoltalk-max-tokens filters the chat data alone: the tool-use tasks keep every conversation."""
    from nanochat.finetune import get_args
    from tasks.mixtures import build_mixtures
    from nanochat.chat_data import render_row
    from nanochat.tokenizer import get_tokenizer
    tok = get_tokenizer()
    flags = [*SMALL, "--smoltalk-size=200"]
    _, _, full = build_mixtures(get_args("sft", flags), tok)
    train, _, mix = build_mixtures(get_args("sft", [*flags, "--smoltalk-max-tokens=128"]), tok)
    assert full["SmolTalk train"] == 200 and 0 < mix["SmolTalk train"] < 200
    assert mix["smoltalk_dropped_long"] == 200 - mix["SmolTalk train"]
    assert {k: v for k, v in mix.items() if k.startswith(("GSM8K", "Identity", "SpellingBee"))} == \
           {k: v for k, v in full.items() if k.startswith(("GSM8K", "Identity", "SpellingBee"))}
    smoltalk = train.tasks[0]  # the first part of the mixture: what is kept has its first reply within 129 tokens
    assert len(smoltalk) == mix["SmolTalk train"]
    assert all(render_row(tok, c, 129)[2] != "reply" for c in smoltalk)
    with pytest.raises(SystemExit):
        get_args("sft", [*SMALL, "--smoltalk-max-tokens=-1"])
    assert "--smoltalk-max-tokens -1: must be >= 0" in capsys.readouterr().err


# -----------------------------------------------------------------------------
# torchrun


def test_two_ranks_match_one_process(tiny_run, shared_data, tmp_path):
    """mid_train on 2 gloo ranks: the same global batches and the same losses as one process."""
    import shutil
    from tests.distributed_helpers import run, job_env, torchrun_cmd, single_cmd, report, max_rel_diff
    base = tmp_path / "base"
    shutil.copytree(tiny_run, base)
    args = [*SMALL, "--num-iterations=3", "--source=base", "--eval-tokens=512"]  # 4 val rows: 2x2 or 1x(2x2)
    env = job_env(base, NANOCHAT_LOCAL_DATA=shared_data)
    run(single_cmd("scripts.mid_train", [*args, "--output-tag=one"]), env)
    one = report(base, "mid_train")
    run(torchrun_cmd("scripts.mid_train", [*args, "--output-tag=two"]), env)
    two = report(base, "mid_train")
    assert one["world_size"] == 1 and two["world_size"] == 2
    assert max_rel_diff(two["losses"], one["losses"]) < 1e-5
    assert abs(two["val_loss"] - one["val_loss"]) / one["val_loss"] < 1e-5
    assert one["conversations"] == two["conversations"] and one["truncated_conversations"] == two["truncated_conversations"]
