"""HumanEval: 164 Python functions to complete from a signature and docstring, graded by running their
unit tests. Source: HuggingFace `openai/openai_humaneval`; locally eval_chat/humaneval/HumanEval.jsonl.gz.

The user message is the prompt (imports, signature, docstring); the reference assistant answer is the
prompt plus the canonical body, i.e. the complete function.
"""

import re

from tasks.common import Task, load_rows, shuffled

_FENCE = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)```", re.DOTALL)


def extract_program(completion):
    """The first ```python (or bare ```) fenced block of the completion, else the whole completion."""
    m = _FENCE.search(completion)
    return m.group(1) if m else completion


def prompt_imports(prompt):
    """The prompt's top-level import lines: completions often use them (List, math) without repeating them."""
    return [line for line in prompt.splitlines() if line.startswith(("import ", "from "))]


class HumanEval(Task):
    eval_type = "generative"

    def __init__(self, timeout=5.0, memory_limit_bytes=256 * 2**20, **kwargs):
        super().__init__(**kwargs)
        self.timeout, self.memory_limit_bytes = timeout, memory_limit_bytes
        self.rows = shuffled(load_rows("eval_chat/humaneval/HumanEval.jsonl.gz",
                                       "openai/openai_humaneval", "openai_humaneval", "test"))

    def get_example(self, index):
        row = self.rows[index]
        return {"messages": [{"role": "user", "content": row["prompt"]},
                             {"role": "assistant", "content": row["prompt"] + row["canonical_solution"]}],
                "task_id": row["task_id"], "entry_point": row["entry_point"], "test": row["test"]}

    def build_program(self, conversation, completion):
        """The script that passes iff the completion is correct: imports, the model's code, the tests."""
        imports = prompt_imports(conversation["messages"][0]["content"])
        return "\n".join([*imports, "", extract_program(completion), "", conversation["test"], "",
                          f"check({conversation['entry_point']})", ""])

    def evaluate(self, conversation, completion):
        """Run the completion against the problem's tests in a subprocess sandbox; pass iff it exits cleanly."""
        from nanochat.execution import execute_code  # imported here: only HumanEval grading needs it
        return execute_code(self.build_program(conversation, completion), timeout=self.timeout,
                            memory_limit_bytes=self.memory_limit_bytes).success
