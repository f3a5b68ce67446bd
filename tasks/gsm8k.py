"""GSM8K: grade-school math word problems with worked solutions. Source: HuggingFace `openai/gsm8k`
(configs "main" and "socratic"); locally eval_chat/gsm8k/{train,test,test_socratic}.jsonl.

Calculator annotations in the solutions, "16 - 3 - 4 = <<16-3-4=9>>9 eggs", become tool calls (a python
part with the expression, a python_output part with the result), so the model learns to use the engine's
python tool for arithmetic. The solution ends with "#### <answer>".
"""

import re

from tasks.common import Task, load_rows, shuffled, extract_answer, last_text, check_choice

SUBSETS = ("main", "socratic")
SPLITS = ("train", "test")

_CALC = re.compile(r"<<([^<>]*)>>")


def solution_parts(answer):
    """GSM8K's annotated solution as assistant parts: text, then python + python_output per <<expr=result>>."""
    parts = []
    for k, piece in enumerate(_CALC.split(answer)):  # text, annotation, text, annotation, ..., text
        if k % 2 == 0:
            parts += [{"type": "text", "text": piece}] if piece else []
        else:
            expr, _, result = piece.rpartition("=")
            parts += [{"type": "python", "text": expr}, {"type": "python_output", "text": result}]
    return parts


class GSM8K(Task):
    eval_type = "generative"

    def __init__(self, subset="main", split="test", **kwargs):
        super().__init__(**kwargs)
        check_choice("GSM8K subset", subset, SUBSETS)
        check_choice("GSM8K split", split, SPLITS)
        self.subset, self.split = subset, split
        local = f"eval_chat/gsm8k/{split}.jsonl" if subset == "main" else f"eval_chat/gsm8k/{split}_socratic.jsonl"
        self.rows = shuffled(load_rows(local, "openai/gsm8k", subset, split))

    def get_example(self, index):
        row = self.rows[index]
        return {"messages": [{"role": "user", "content": row["question"]},
                             {"role": "assistant", "content": solution_parts(row["answer"])}]}

    def evaluate(self, conversation, completion):
        """Correct iff the completion's "#### n" equals the reference's (commas ignored)."""
        reference = extract_answer(last_text(conversation["messages"][-1]["content"]))
        predicted = extract_answer(completion)
        return predicted is not None and predicted == reference
