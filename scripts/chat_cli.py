"""
Chat with a trained model in the terminal, replies streamed token by token.

    python -m scripts.chat_cli                          # interactive, latest SFT checkpoint
    python -m scripts.chat_cli -p "Why is the sky blue?" # one question, one answer, exit
    python -m scripts.chat_cli --source base --model-tag d2 --temperature 0
    python -m scripts.chat_cli --source path/to/hf_export

Interactive commands: 'clear' starts a new conversation, 'quit' or 'exit' (or Ctrl-D / Ctrl-C) leaves.
The prompt is rendered exactly as the model saw chats in training (engine.render_prompt). When the model
calls its python tool, the code and its output are shown on their own lines.
"""

import argparse
import sys

from nanochat.common import compute_init, run_cli
from nanochat.engine import Engine, TextStream, render_prompt, reply_content, prepare_for_inference
from nanochat.hf_convert import load_any


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-i", "--source", default="sft", help="which model: a checkpoint stage (base, mid, sft, rl) "
                   "or the path of an HF export folder (default sft)")
    p.add_argument("-g", "--model-tag", default=None, help="checkpoint tag, e.g. d20 (default: the only tag there)")
    p.add_argument("-s", "--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("-p", "--prompt", default="", help="ask this one question, print the reply and exit")
    p.add_argument("-t", "--temperature", type=float, default=0.6, help="0 = greedy (default 0.6)")
    p.add_argument("-k", "--top-k", type=int, default=50, help="sample from the k likeliest tokens, 0 = all (default 50)")
    p.add_argument("--top-p", type=float, default=1.0,
                   help="nucleus sampling: smallest set of tokens with this much probability, 1 = off (default 1)")
    p.add_argument("-m", "--max-tokens", type=int, default=512,
                   help="longest reply in tokens (default 512; the context length also caps it)")
    p.add_argument("--seed", type=int, default=42, help="seed of the first reply; reply n uses seed + n (default 42)")
    p.add_argument("--device-type", default="", help="cuda, mps or cpu (default: autodetect)")
    args = p.parse_args(argv)
    if args.temperature < 0:
        p.error(f"--temperature {args.temperature} must be >= 0")
    if not 0 < args.top_p <= 1:
        p.error(f"--top-p {args.top_p} must be in (0, 1]")
    if args.max_tokens < 1:
        p.error(f"--max-tokens {args.max_tokens} must be >= 1")
    return args


class Printer:
    """Shows a streamed reply: text as it becomes whole characters, tool calls on their own lines."""

    def __init__(self, tokenizer, out=None):
        self.out = out or sys.stdout  # looked up now, not at import, so redirection works
        self.stream = TextStream(tokenizer)
        sp = tokenizer.encode_special
        self.markers = {sp("<|python_start|>"): "\n[python] ", sp("<|python_end|>"): "\n",
                        sp("<|output_start|>"): "[output] ", sp("<|output_end|>"): "\n"}

    def write(self, text):
        if text:
            self.out.write(text)
            self.out.flush()

    def token(self, token):
        marker = self.markers.get(token)
        self.write(self.stream.add(token) if marker is None else self.stream.flush() + marker)

    def end(self):
        self.write(self.stream.flush() + "\n")


def fit_context(tokenizer, messages, context):
    """Prompt ids for the conversation, dropping the oldest exchanges until it leaves room for a reply.
    Returns None if even the last user message alone is too long."""
    while True:
        prompt = render_prompt(tokenizer, messages)
        if len(prompt) < context:
            return prompt
        if len(messages) < 3:
            return None
        del messages[:2]  # oldest user message and its reply
        print(f"(conversation longer than the model's {context}-token context: dropped the oldest exchange)")


def reply(engine, tokenizer, messages, args, seed):
    """Stream the assistant's reply to `messages` and append it to them."""
    context = engine.model.config.sequence_len
    prompt = fit_context(tokenizer, messages, context)
    if prompt is None:
        messages.pop()
        print(f"(that message is too long for the model's {context}-token context; try a shorter one)")
        return
    printer, ids = Printer(tokenizer), []
    for column, _ in engine.generate(prompt, max_tokens=args.max_tokens, temperature=args.temperature,
                                     top_k=args.top_k, top_p=args.top_p, seed=seed):
        if column[0] in (engine.assistant_end, engine.bos):
            break
        ids.append(column[0])
        printer.token(column[0])
    printer.end()
    messages.append({"role": "assistant", "content": reply_content(tokenizer, ids)})


def main(argv=None):
    args = get_args(argv)
    rt = compute_init(args.device_type)
    model, tokenizer, _ = load_any(args.source, rt.device, model_tag=args.model_tag, step=args.step,
                                   compute_dtype=rt.dtype)
    engine = Engine(prepare_for_inference(model), tokenizer)
    if args.prompt:
        return reply(engine, tokenizer, [{"role": "user", "content": args.prompt}], args, args.seed)

    print("nanochat: type a message; 'clear' starts over, 'quit' or Ctrl-D leaves.")
    messages, turn = [], 0
    try:
        while (text := input("\nUser: ").strip()).lower() not in ("quit", "exit"):
            if text.lower() == "clear":
                messages = []
                print("(conversation cleared)")
            elif text:
                messages.append({"role": "user", "content": text})
                print("\nAssistant: ", end="", flush=True)
                reply(engine, tokenizer, messages, args, args.seed + turn)
                turn += 1
    except (EOFError, KeyboardInterrupt):
        print()


if __name__ == "__main__":
    run_cli(main)
