"""scripts/chat_cli.py against the tiny trained checkpoint: one-shot, interactive with clear/quit,
multi-turn prompts built by render_prompt, and a real `python -m scripts.chat_cli` with piped stdin."""

import io
import os
import subprocess
import sys

import pytest
import torch

from nanochat.engine import Engine, render_prompt, prepare_for_inference
from scripts import chat_cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ["--source", "base", "--temperature", "0", "--max-tokens", "12"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def fp32(monkeypatch):
    monkeypatch.setenv("NANOCHAT_DTYPE", "float32")  # so the expected replies below are exact


def expected_reply(messages, max_tokens=12):
    """What the CLI should print for `messages`: the engine's greedy reply, decoded."""
    from nanochat.checkpoint import load_model
    model, tokenizer, _ = load_model("base", "cpu", compute_dtype=torch.float32)
    engine = Engine(prepare_for_inference(model), tokenizer)
    seqs, _ = engine.generate_batch(render_prompt(tokenizer, messages), max_tokens=max_tokens, temperature=0)
    return tokenizer.decode(seqs[0][len(render_prompt(tokenizer, messages)):])


def test_one_shot(tiny_base, fp32, capsys):
    chat_cli.main(ARGS + ["-p", "Tell me about the sea."])
    out = capsys.readouterr().out
    assert "Loaded base checkpoint d2" in out
    reply = expected_reply([{"role": "user", "content": "Tell me about the sea."}])
    assert reply.strip()
    assert out.endswith(reply + "\n")


def test_interactive_clear_and_multi_turn(tiny_base, fp32, capsys, monkeypatch):
    prompts = []
    original = Engine.generate

    def recording(self, tokens, *a, **kw):
        prompts.append(list(tokens))
        return original(self, tokens, *a, **kw)
    monkeypatch.setattr(Engine, "generate", recording)
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello there\nHow are you?\nclear\n\nHow are you?\nquit\nnot read\n"))
    chat_cli.main(ARGS)
    out = capsys.readouterr().out
    assert out.count("Assistant: ") == 3 and "(conversation cleared)" in out

    from nanochat.tokenizer import get_tokenizer
    tokenizer = get_tokenizer()
    first = expected_reply([{"role": "user", "content": "Hello there"}])
    # turn 2 sees turn 1, exactly as render_conversation lays it out
    turn2 = [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": first},
             {"role": "user", "content": "How are you?"}]
    assert prompts[0] == render_prompt(tokenizer, turn2[:1])
    assert prompts[1] == render_prompt(tokenizer, turn2)
    # after 'clear' the same question starts from scratch
    assert prompts[2] == render_prompt(tokenizer, [{"role": "user", "content": "How are you?"}])


def test_streaming_printer_holds_back_partial_characters(tiny_base):
    from nanochat.tokenizer import get_tokenizer
    tokenizer = get_tokenizer()
    writes = []

    class Terminal:  # records every chunk the terminal would receive
        def write(self, s):
            writes.append(s)

        def flush(self):
            pass
    printer = chat_cli.Printer(tokenizer, Terminal())
    sp = tokenizer.encode_special
    for t in tokenizer.encode("Cost: 5€ ") + [sp("<|python_start|>")] + tokenizer.encode("5*2") + \
             [sp("<|python_end|>"), sp("<|output_start|>")] + tokenizer.encode("10") + [sp("<|output_end|>")]:
        printer.token(t)
    printer.end()
    assert "".join(writes) == "Cost: 5€ \n[python] 5*2\n[output] 10\n\n"
    assert not any("\ufffd" in w for w in writes)


def test_missing_checkpoint_is_a_clear_error(tiny_base):
    from nanochat.common import UserError
    with pytest.raises(UserError, match="no sft checkpoints"):
        chat_cli.main(["--source", "sft", "-p", "hi"])
    proc = subprocess.run([sys.executable, "-m", "scripts.chat_cli", "--source", "sft", "-p", "hi"], capture_output=True,
                          text=True, cwd=REPO, env={**os.environ, "NANOCHAT_BASE_DIR": str(tiny_base)}, timeout=300)
    assert proc.returncode == 1 and "no sft checkpoints" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_subprocess_with_piped_stdin(tiny_base):
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(tiny_base), "NANOCHAT_DTYPE": "float32"}
    proc = subprocess.run([sys.executable, "-m", "scripts.chat_cli"] + ARGS, input="Hi!\nclear\nBye\n",  # EOF = Ctrl-D
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("Assistant: ") == 2 and "(conversation cleared)" in proc.stdout
    assert "Traceback" not in proc.stderr


def test_long_conversations_drop_the_oldest_exchanges(tiny_base, capsys):
    from nanochat.tokenizer import get_tokenizer
    tokenizer = get_tokenizer()
    turns = [{"role": "user", "content": "word " * 20}, {"role": "assistant", "content": "reply " * 20}] * 4
    messages = turns[:-1]  # 3 exchanges and a new question
    context = len(render_prompt(tokenizer, messages[-3:])) + 5  # room for the last exchange only
    prompt = chat_cli.fit_context(tokenizer, messages, context)
    assert len(messages) == 3 and prompt == render_prompt(tokenizer, messages) and len(prompt) < context
    assert capsys.readouterr().out.count("dropped the oldest exchange") == 2
    assert chat_cli.fit_context(tokenizer, [{"role": "user", "content": "word " * 200}], context) is None


def test_one_shot_from_an_hf_export_folder(tiny_base, fp32, capsys, tmp_path):
    from nanochat.checkpoint import load_model
    from nanochat.hf_export import export_model
    model, tokenizer, _ = load_model("base", "cpu")
    export_model(model, tokenizer, str(tmp_path / "export"))
    capsys.readouterr()
    chat_cli.main(["--source", str(tmp_path / "export")] + ARGS[2:] + ["-p", "Tell me about the sea."])
    assert capsys.readouterr().out.endswith(expected_reply([{"role": "user", "content": "Tell me about the sea."}]) + "\n")
