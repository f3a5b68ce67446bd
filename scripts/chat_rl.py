"""
Reinforcement learning on problems with checkable answers (GSM8K by default, or SpellingBee letter
counting, which a tiny model can actually learn): "GRPO" simplified to on-policy REINFORCE with a
group-mean baseline.

    python -m scripts.chat_rl                                   # from the SFT checkpoint, GSM8K, one epoch
    python -m scripts.chat_rl --task=spellingbee --num-iterations=50 --examples-per-step=8 --num-samples=8
    torchrun --standalone --nproc_per_node=8 -m scripts.chat_rl -- --model-tag=d20
    python -m scripts.chat_rl --resume

Each step, for each of --examples-per-step training problems (strided across ranks), the Engine samples
--num-samples replies (the python tool runs as at inference; its forced output tokens are not trained).
Reward = 1 if the final answer is right, else 0; advantage = reward - the mean reward of that problem's
samples. Loss = sum over sampled tokens of advantage x cross-entropy / sampled tokens in the whole step:
its gradient is the token-level policy gradient. On-policy, no KL penalty, no ratio clipping; LR
decays linearly to 0. pass@1 (greedy) on held-out problems before, every --eval-every steps and at
the end. The LR flags mean the LR at a 2^19-token batch, as in every stage; they default to the
starting checkpoint's and train at its batch scale x --init-lr-frac. Writes chatrl_checkpoints/<tag>/
and report/chat_rl.json.
"""

import time
import argparse

import torch

from nanochat.common import print0, init_wandb, run_cli, UserError
from nanochat.chat_data import rows_to_batch
from tasks.gsm8k import GSM8K
from tasks.spellingbee import SpellingBee
from nanochat.scaling import B_REF, add_lr_flags, batch_lr_scale, inherit_lrs
from nanochat.training import (add_run_flags, add_start_flags, begin, start_finetune, build_optimizer, set_schedule,
                               all_reduce_sum, save, run_loop, eval_due, finish, close)


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("starting point")
    add_start_flags(g, ["sft", "mid", "base"], "continue exactly from the latest RL checkpoint of the tag (all other settings come from it)")
    g = p.add_argument_group("problems and sampling")
    g.add_argument("--task", choices=["gsm8k", "spellingbee"], default="gsm8k", help="train on GSM8K train and evaluate on GSM8K test, or on SpellingBee letter counting (train words / held-out test words)")
    g.add_argument("--spelling-size", type=int, default=20000, help="[spellingbee] number of training problems")
    g.add_argument("--num-epochs", type=int, default=1, help="passes over the training problems (when --num-iterations is -1)")
    g.add_argument("--num-iterations", type=int, default=-1, help="optimizer steps; -1 = --num-epochs passes over the problems")
    g.add_argument("--examples-per-step", type=int, default=16, help="problems per optimizer step across all ranks (a multiple of the world size)")
    g.add_argument("--num-samples", type=int, default=16, help="replies sampled per problem (the group whose mean reward is the baseline)")
    g.add_argument("--max-new-tokens", type=int, default=256, help="token budget per reply")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of the rollouts")
    g.add_argument("--top-k", type=int, default=50, help="rollouts sample among the k most likely tokens (0 = all)")
    g = p.add_argument_group("optimization")
    g.add_argument("--device-batch-size", type=int, default=8, help="sequences per forward/backward pass")
    add_lr_flags(g, default=False, note="the starting checkpoint's; scaled by its batch's sqrt(B / 2^19), at least 0.5")
    g.add_argument("--init-lr-frac", type=float, default=0.05, help="every LR is multiplied by this (default 0.05)")
    g.add_argument("--weight-decay", type=float, default=0.0, help="Muon weight decay (default 0)")
    g.add_argument("--seed", type=int, default=42, help="seed of the rollouts (each problem's samples get their own seed from it)")
    g = p.add_argument_group("evaluation, checkpoints, logging")
    g.add_argument("--eval-every", type=int, default=60, help="steps between pass@1 evaluations (-1 = only before and after)")
    g.add_argument("--eval-examples", type=int, default=400, help="held-out problems in each pass@1 evaluation")
    add_run_flags(g, save_every=60, compile_flag=False)
    args = p.parse_args(argv)
    for k in ("examples_per_step", "num_samples", "max_new_tokens", "device_batch_size", "eval_examples", "num_epochs"):
        if getattr(args, k) < 1:
            p.error(f"--{k.replace('_', '-')} {getattr(args, k)}: must be >= 1")
    return args


def make_tasks(args):
    """(training problems, held-out evaluation problems); SpellingBee: letter counting only, whose answer is
    a checkable number."""
    if args.task == "gsm8k":
        return GSM8K("main", "train"), GSM8K("main", "test", stop=args.eval_examples)
    return (SpellingBee(args.spelling_size, "train", count_fraction=1.0),
            SpellingBee(args.eval_examples, "test", count_fraction=1.0))


def rollout(engine, tokenizer, prompt, args, seed):
    """num_samples replies to one prompt: (rows of (ids, mask) with the prompt masked and the terminal
    token kept -- the model must learn to stop -- and the reply texts for grading)."""
    stops = {tokenizer.get_bos_token_id(), tokenizer.encode_special("<|assistant_end|>")}
    n = args.num_samples
    ids = [list(prompt) for _ in range(n)]
    masks = [[0] * len(prompt) for _ in range(n)]
    done = [False] * n
    for column, mask_column in engine.generate(prompt, n, max_tokens=args.max_new_tokens, temperature=args.temperature,
                                               top_k=args.top_k or None, seed=seed):
        for i, (t, m) in enumerate(zip(column, mask_column)):
            if not done[i]:
                ids[i].append(t)
                masks[i].append(m)
                done[i] = t in stops
    texts = [tokenizer.decode([t for t in row[len(prompt):] if t not in stops]) for row in ids]
    return list(zip(ids, masks)), texts


def policy_gradient_backward(model, rows, advantages, scale, device_batch_size, pad_id, device):
    """Backward of loss = scale * sum over rows r and their sampled tokens i of adv_r * CE_r,i, in
    micro-batches of device_batch_size rows; returns the loss. With scale = 1 / (sampled tokens in
    the step) its gradient is the token-level-normalised policy gradient, -sum adv * d log p / n
    (CE = -log p). Under torchrun the caller multiplies scale by the world size, because the optimizer
    averages gradients over ranks."""
    total = 0.0
    for a in range(0, len(rows), device_batch_size):
        chunk = rows[a:a + device_batch_size]
        x, y = rows_to_batch(chunk, pad_id, device=device)  # targets -1 on the prompt, tool output, padding
        w = torch.tensor(advantages[a:a + len(chunk)], dtype=torch.float32, device=device) * scale
        loss = model(x, y, loss_weights=w[:, None].expand_as(y))
        loss.backward()
        total += loss.item()
    return total


def problem_seed(base, step, index):
    """A distinct, reproducible sampling seed per (run seed, step, problem)."""
    return (base * 1_000_003 + step * 10_007 + index) & 0x7FFFFFFF


def main(argv=None):
    from nanochat.engine import Engine
    from nanochat.task_eval import run_generative
    args = get_args(argv)
    rt, tokenizer, t_start = begin(args)
    if args.examples_per_step % rt.world_size:
        raise UserError(f"--examples-per-step {args.examples_per_step} must be a multiple of the world size {rt.world_size}")
    # RL starts with fresh optimizer moments, as before this stage shared the start-up code
    start = start_finetune("rl", args, tokenizer, rt, load_optimizer=False, need_loader=False)
    args, model, meta, parent, ckpt_dir = start.args, start.model, start.meta, start.parent, start.ckpt_dir
    config = model.config
    if not args.resume:  # LRs at the reference batch, trained at the starting checkpoint's batch scale
        inherit_lrs(args, meta)
        args.lr_scale = batch_lr_scale(meta.get("total_batch_size") or B_REF)
    # RL checkpoints written before the LR flags meant the same in every stage saved effective LRs
    args.lr_scale = getattr(args, "lr_scale", 1.0)
    optimizer = build_optimizer(model, args, rt, args.init_lr_frac * args.lr_scale, args.weight_decay, start)
    del start
    # One Engine for the whole run: it keeps an inference copy of the weights (in the compute dtype) and
    # the optimizer writes the masters in place, so each step's rollouts first refresh that copy.
    engine = Engine(model, tokenizer)

    train_task, eval_task = make_tasks(args)
    E = args.examples_per_step
    N = args.num_iterations if args.num_iterations > 0 else max(1, args.num_epochs * len(train_task) // E)
    print0(f"Task {args.task}: {len(train_task):,} training problems, {len(eval_task)} held-out; {N} steps of {E} "
           f"problems x {args.num_samples} samples, up to {args.max_new_tokens} new tokens each")
    print0(f"LRs at 2^19-token batches (x{args.lr_scale:.4f} the starting checkpoint's batch scale x{args.init_lr_frac} "
           f"init frac): embedding {args.embedding_lr:.4g}, unembedding {args.unembedding_lr:.4g}, "
           f"matrix {args.matrix_lr:.4g}, scalar {args.scalar_lr:.4g}")
    wandb = init_wandb(args.run, "nanochat-rl", vars(args))
    loop = meta["loop_state"] if args.resume else {"step": 0, "rewards": [], "losses": [], "seq_lens": [],
                                                    "pass1_history": [], "skipped_steps": 0, "too_long": 0,
                                                    "total_training_time": 0.0}
    eval_args = argparse.Namespace(num_samples=1, max_new_tokens=args.max_new_tokens, temperature=0.0, top_k=None,
                                   seed=args.seed)

    def evaluate(step, last):
        if not eval_due(loop["pass1_history"], step, last, args.eval_every):
            return
        model.eval()
        engine.refresh_weights()
        passed, total = run_generative(eval_task, engine, tokenizer, rt, eval_args, len(eval_task), progress=False)[:2]
        model.train()
        acc = passed / max(1, total)
        loop["pass1_history"].append([step, acc])
        print0(f"Step {step:05d} | pass@1 (greedy) {passed}/{total} = {100 * acc:.2f}% on held-out {args.task}")
        wandb.log({"step": step, "eval/pass@1": acc})

    def save_step(step):
        save(ckpt_dir, step, {"stage": "rl", "parent": parent, "num_iterations": N}, model, optimizer, rt, tokenizer,
             loop, args)

    def train_step(step, steps_this_run):
        t0 = time.time()
        # Rollouts with the current weights (on-policy).
        model.eval()
        engine.refresh_weights()
        rows, advantages, rewards = [], [], []
        for k in range(rt.rank, E, rt.world_size):
            index = (step * E + k) % len(train_task)
            conversation = train_task[index]
            prompt = tokenizer.render_for_completion(conversation)
            if len(prompt) >= config.sequence_len:  # no room for a reply: nothing to learn from it
                loop["too_long"] += 1
                continue
            samples, texts = rollout(engine, tokenizer, prompt, args, problem_seed(args.seed, step, index))
            r = [train_task.reward(conversation, t) for t in texts]
            mean = sum(r) / len(r)
            rows += samples
            advantages += [x - mean for x in r]
            rewards += r
        model.train()
        sampled = [sum(m[1:]) for _, m in rows]  # targets that carry loss: sampled tokens only
        counts = all_reduce_sum(torch.tensor([sum(sampled), sum(a != 0 for a in advantages), sum(rewards), len(rewards)],
                                             dtype=torch.float64, device=rt.device), rt)
        n_tokens, n_informative = counts[0].item(), counts[1].item()
        lrm = 1.0 - step / N  # linear from 1 towards 0 over the run
        set_schedule(optimizer, lrm)
        loss_sum = policy_gradient_backward(model, rows, advantages, rt.world_size / max(n_tokens, 1.0),
                                            args.device_batch_size, tokenizer.encode_special("<|assistant_end|>"),
                                            rt.device)
        if rt.ddp:  # a rank whose every prompt was too long still joins the gradient reduction
            for p in model.parameters():
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
        if n_informative > 0:
            optimizer.step()
        else:  # every group's samples agreed: zero gradient, don't let momentum move the weights
            loop["skipped_steps"] += 1
        model.zero_grad(set_to_none=True)
        if rt.ddp:
            loss_sum = all_reduce_sum(torch.tensor([loss_sum], dtype=torch.float64, device=rt.device), rt).item() / rt.world_size
        dt = time.time() - t0
        loop["total_training_time"] += dt
        replies = max(1.0, counts[3].item())
        mean_reward = counts[2].item() / replies
        loop["rewards"].append(mean_reward)
        loop["losses"].append(loss_sum)
        loop["seq_lens"].append(n_tokens / replies)
        print0(f"step {step + 1:05d}/{N:05d} | reward {mean_reward:.3f} | sampled tokens/reply {n_tokens / replies:.1f} | "
               f"informative samples {int(n_informative)}/{int(counts[3].item())} | lrm {lrm:.3f} | dt {dt:.1f}s")
        wandb.log({"step": step + 1, "train/reward": mean_reward, "train/lrm": lrm, "train/loss": loss_sum})

    model.train()
    step, last = run_loop(rt, args, loop["step"], lambda s: s >= N, train_step, save_step, evaluate)
    if not last:
        return close(wandb)
    hist = loop["pass1_history"]
    report = {
        "stage": "rl", "model_tag": args.output_tag, "parent": parent, "model_config": config.to_dict(),
        "task": args.task, "step": step, "num_iterations": N,
        "pass1_before": hist[0][1] if hist else None, "pass1_after": hist[-1][1] if hist else None,
        "eval_examples": len(eval_task), "pass1_history": hist, "rewards": loop["rewards"],
        "mean_sampled_tokens": loop["seq_lens"], "losses": loop["losses"], "skipped_steps": loop["skipped_steps"],
        "too_long_prompts": loop["too_long"], "total_training_time": loop["total_training_time"],
    }
    path = finish("chat_rl", report, rt, t_start, False, args, wandb)
    print0(f"Done: pass@1 {report['pass1_before']:.4f} -> {report['pass1_after']:.4f}. Report: {path}")


if __name__ == "__main__":
    run_cli(main)
