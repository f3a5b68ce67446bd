"""
Scoring a chat model on tasks through the engine (the one inference path), for chat_eval, SFT's
before/after checks and RL's pass@1:
  categorical (ARC-Easy, ARC-Challenge, MMLU): one forward pass over the prompt (the conversation up
      to <|assistant_start|>); the answer is the allowed letter with the highest logit at the last
      position. No sampling, so it measures knowledge, not formatting.
  generative (GSM8K, HumanEval, SpellingBee): the Engine writes a reply (with its python tool) and the
      task grades it. With num_samples k a problem passes if any sample does (pass@k).
ChatCORE = mean over the six tasks of the centered accuracy (acc - b) / (1 - b), with b = 0.25 for the
4-way multiple-choice tasks and 0 for the generative ones. Problems are strided across torchrun ranks
and the counts summed.
"""

import torch
import torch.distributed as dist
from torch.nn.utils.rnn import pad_sequence

from tasks.arc import ARC
from tasks.mmlu import MMLU
from tasks.gsm8k import GSM8K
from tasks.humaneval import HumanEval
from tasks.spellingbee import SpellingBee


# name -> (constructor, random-guess accuracy used for centering); tasks load their data when built
TASKS = {
    "ARC-Easy": (lambda: ARC("ARC-Easy", "test"), 0.25),
    "ARC-Challenge": (lambda: ARC("ARC-Challenge", "test"), 0.25),
    "MMLU": (lambda: MMLU("all", "test"), 0.25),
    "GSM8K": (lambda: GSM8K("main", "test"), 0.0),
    "HumanEval": (lambda: HumanEval(), 0.0),
    "SpellingBee": (lambda: SpellingBee(size=256, split="test"), 0.0),
}


def _progress(total, desc, enabled):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True)


def _sum_across_ranks(passed, total, device):
    counts = torch.tensor([passed, total], dtype=torch.long, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
    return int(counts[0]), int(counts[1])


def letter_token_ids(tokenizer, letters, cache):
    """Token id of each answer letter; each must be a single token (it is, for any BPE trained on text)."""
    out = []
    for letter in letters:
        if letter not in cache:
            ids = tokenizer.encode(letter)
            if len(ids) != 1:
                raise ValueError(f"answer letter {letter!r} is {len(ids)} tokens in this tokenizer; categorical "
                                 f"scoring needs single-token letters")
            cache[letter] = ids[0]
        out.append(cache[letter])
    return out


@torch.no_grad()
def run_categorical(task, model, tokenizer, rt, batch_size, num_problems, progress=True, desc=""):
    """Pick the allowed letter with the highest logit after <|assistant_start|>. Returns (passed, total)
    summed over ranks."""
    bos = tokenizer.get_bos_token_id()
    T = model.config.sequence_len
    cache = {}
    mine = list(range(rt.rank, num_problems, rt.world_size))
    passed = 0
    bar = _progress(len(mine), desc, progress and rt.master)
    for b0 in range(0, len(mine), batch_size):
        convs = [task[i] for i in mine[b0:b0 + batch_size]]
        # Long prompts keep their end: the answer is read at the last position.
        prompts = [tokenizer.render_for_completion(c)[-T:] for c in convs]
        ids = pad_sequence([torch.tensor(p) for p in prompts], batch_first=True, padding_value=bos)
        logits = model(ids.to(rt.device))
        for r, (conv, p) in enumerate(zip(convs, prompts)):
            allowed = letter_token_ids(tokenizer, conv["letters"], cache)
            scores = logits[r, len(p) - 1, allowed]
            answer = conv["letters"][int(scores.argmax())]
            passed += bool(task.evaluate(conv, answer))
        bar.update(len(convs))
        bar.set_postfix(acc=f"{passed / max(1, min(b0 + batch_size, len(mine))):.3f}")
    bar.close()
    return _sum_across_ranks(passed, len(mine), rt.device)


def completion_text(tokenizer, tokens):
    """Decode a generated reply, stopping at the first <|assistant_end|> or <|bos|> if the engine
    left one in."""
    stops = {tokenizer.get_bos_token_id(), tokenizer.encode_special("<|assistant_end|>")}
    return tokenizer.decode(tokens[:next((k for k, t in enumerate(tokens) if t in stops), len(tokens))])


def run_generative(task, engine, tokenizer, rt, args, num_problems, progress=True, desc=""):
    """Generate num_samples replies per problem with the Engine; pass if any is correct. A prompt that
    leaves no room for a reply in the model's context counts as failed (and is counted). Returns
    (passed, total, too_long) summed over ranks."""
    limit = engine.model.config.sequence_len
    mine = list(range(rt.rank, num_problems, rt.world_size))
    passed = too_long = 0
    bar = _progress(len(mine), desc, progress and rt.master)
    for done, i in enumerate(mine, 1):
        conv = task[i]
        prompt = tokenizer.render_for_completion(conv)
        if len(prompt) >= limit:
            too_long += 1
        else:
            sequences, _ = engine.generate_batch(prompt, num_samples=args.num_samples, max_tokens=args.max_new_tokens,
                                                 temperature=args.temperature, top_k=args.top_k or None,
                                                 seed=args.seed + i)
            completions = [completion_text(tokenizer, list(seq[len(prompt):])) for seq in sequences]
            passed += any(task.evaluate(conv, c) for c in completions)
        bar.update(1)
        bar.set_postfix(acc=f"{passed / done:.3f}")
    bar.close()
    passed, total = _sum_across_ranks(passed, len(mine), rt.device)
    too_long, _ = _sum_across_ranks(too_long, 0, rt.device)
    return passed, total, too_long


def turn_end_rate(engine, tokenizer, rt, prompts, max_new_tokens=None, temperature=0.0, top_k=None, seed=42):
    """Does the model know when to stop? Of `prompts` (token ids ending with <|assistant_start|>), how
    many replies (greedy by default; prompt i sampled with seed + i) end with <|assistant_end|> before
    max_new_tokens or the context runs out (a <|bos|> is not a proper end). Prompts are strided across
    ranks; returns (ended, total) summed."""
    end = tokenizer.encode_special("<|assistant_end|>")
    mine = list(range(rt.rank, len(prompts), rt.world_size))
    ended = 0
    for i in mine:
        for column, _ in engine.generate(prompts[i], 1, max_tokens=max_new_tokens, temperature=temperature,
                                         top_k=top_k, seed=seed + i):
            if column[0] == end:
                ended += 1
                break
    return _sum_across_ranks(ended, len(mine), rt.device)


def chatcore(results):
    """Mean centered accuracy over all six tasks, or None if any is missing."""
    missing = any(name not in results for name in TASKS)
    return None if missing else sum(results[name]["centered"] for name in TASKS) / len(TASKS)
