"""Identity: synthetic conversations that teach the model its own name and who made it, from question/answer
templates with {{name}} and {{author}} placeholders: the 91 of LLaMA-Factory's identity set (mostly Chinese)
when NANOCHAT_LOCAL_DATA has it, else a small built-in English set. Each example strings 1-3 distinct
templates into one conversation, chosen by its own random.Random(f"{seed}:{index}"). Richer: CustomJSON.
"""

import os
import json
import random

from nanochat.common import get_local_data_dir
from tasks.common import Task

TEMPLATE_FILE = "chat_sft/llamafactory_demo/identity.json"

BUILTIN_TEMPLATES = [
    ("Hi", "Hi! I'm {{name}}, an AI assistant made by {{author}}. What can I do for you?"),
    ("Who are you?", "I'm {{name}}, a language model built by {{author}}."),
    ("What is your name?", "My name is {{name}}."), ("Who made you?", "I was made by {{author}}."),
    ("Who trained you?", "{{author}} trained me. I'm {{name}}."),
    ("Are you ChatGPT?", "No, I'm {{name}}, a different model, built by {{author}}."),
    ("Tell me about yourself.", "I'm {{name}}, a small chat model created by {{author}}. I can answer "
                                "questions, write, and do arithmetic with a Python tool, though I make mistakes."),
    ("What should I call you?", "You can call me {{name}}."), ("Thanks!", "You're welcome! Happy to help. - {{name}}"),
    ("Were you made by OpenAI or Google?", "Neither: I'm {{name}}, and {{author}} made me.")]


def load_templates():
    """[(question, answer), ...] with placeholders, from the local template file if there is one."""
    root = get_local_data_dir()
    if root is None or not os.path.exists(path := os.path.join(root, TEMPLATE_FILE)):
        return BUILTIN_TEMPLATES
    with open(path, encoding="utf-8") as f:
        rows = json.load(f)
    return [((r["instruction"] + ("\n\n" + r["input"] if r.get("input") else "")), r["output"]) for r in rows]


class Identity(Task):
    def __init__(self, name="nanochat", author="the nanochat developers", size=1000, seed=0, **kwargs):
        super().__init__(**kwargs)
        if not name or not author:
            raise ValueError(f"Identity needs a non-empty name and author, got name={name!r} author={author!r}")
        self.name, self.author, self.size, self.seed = name, author, size, seed
        self.templates, self.rows = load_templates(), range(size)  # example i is generated from (seed, i)

    def fill(self, text):
        return text.replace("{{name}}", self.name).replace("{{author}}", self.author)

    def get_example(self, index):
        rng = random.Random(f"{self.seed}:{index}")  # str seeds hash deterministically
        turns = rng.choices([1, 2, 3], weights=[6, 3, 1])[0]
        pairs = rng.sample(self.templates, min(turns, len(self.templates)))
        return {"messages": [{"role": role, "content": self.fill(text)}
                             for pair in pairs for role, text in zip(("user", "assistant"), pair)]}
