"""
GSM8K: grade-school math word problems with worked solutions. Source: HuggingFace `openai/gsm8k`
(configs "main" and "socratic"); locally eval_chat/gsm8k/{train,test,test_socratic}.jsonl.

The solutions carry calculator annotations, "16 - 3 - 4 = <<16-3-4=9>>9 eggs". Each becomes a tool
call: a python part with the expression and a python_output part with the result, so the model learns
to use the engine's python tool for arithmetic. The solution ends with "#### <answer>".
"""

import re

from tasks.common import Task, load_rows, shuffled, extract_answer, last_text

SUBSETS = ("main", "socratic")
SPLITS = ("train", "test")

_CALC = re.compile(r"<<([^<>]*)>>")


def solution_parts(answer):
    """GSM8K's annotated solution as assistant parts: text, then python + python_output per <<expr=result>>."""
    parts = []
    pieces = _CALC.split(answer)  # text, annotation, text, annotation, ..., text
    for k, piece in enumerate(pieces):
        if k % 2 == 0:
            if piece:
                parts.append({"type": "text", "text": piece})
        else:
            expr, _, result = piece.rpartition("=")
            parts.append({"type": "python", "text": expr})
            parts.append({"type": "python_output", "text": result})
    return parts


class GSM8K(Task):
    eval_type = "generative"

    def __init__(self, subset="main", split="test", **kwargs):
        super().__init__(**kwargs)
        if subset not in SUBSETS:
            raise ValueError(f"GSM8K subset {subset!r} is not one of {SUBSETS}")
        if split not in SPLITS:
            raise ValueError(f"GSM8K split {split!r} is not one of {SPLITS}")
        self.subset, self.split = subset, split
        local = f"eval_chat/gsm8k/{split}.jsonl" if subset == "main" else f"eval_chat/gsm8k/{split}_socratic.jsonl"
        self.rows = shuffled(load_rows(local, "openai/gsm8k", subset, split))

    def num_examples(self):
        return len(self.rows)

    def get_example(self, index):
        row = self.rows[index]
        return {"messages": [
            {"role": "user", "content": row["question"]},
            {"role": "assistant", "content": solution_parts(row["answer"])},
        ]}

    def evaluate(self, conversation, completion):
        """Correct iff the completion's "#### n" equals the reference's (commas ignored)."""
        reference = extract_answer(last_text(conversation["messages"][-1]["content"]))
        predicted = extract_answer(completion)
        return predicted is not None and predicted == reference
