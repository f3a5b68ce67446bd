"""
ARC (AI2 Reasoning Challenge): grade-school science multiple choice, Easy and Challenge subsets.
Source: HuggingFace `allenai/ai2_arc`; locally eval_chat/arc/{subset}_{split}.jsonl in the same schema.
"""

from tasks.common import Task, render_mc, load_rows, shuffled, letter_is_correct, check_choice, LETTERS

SUBSETS = ("ARC-Easy", "ARC-Challenge")
SPLITS = ("train", "validation", "test")


class ARC(Task):
    eval_type = "categorical"

    def __init__(self, subset="ARC-Easy", split="test", **kwargs):
        super().__init__(**kwargs)
        check_choice("ARC subset", subset, SUBSETS)
        check_choice("ARC split", split, SPLITS)
        self.subset, self.split = subset, split
        self.rows = shuffled(load_rows(f"eval_chat/arc/{subset}_{split}.jsonl", "allenai/ai2_arc", subset, split))

    def get_example(self, index):
        row = self.rows[index]
        choices, labels = row["choices"]["text"], row["choices"]["label"]
        # About 4% of questions are labelled 1-4 instead of A-D; present every question with letters
        # (by position) so the model only ever answers with A, B, C, ...
        letters = list(LETTERS[:len(choices)])
        answer = letters[labels.index(row["answerKey"])]
        return {"messages": [{"role": "user", "content": render_mc(row["question"], letters, choices)},
                             {"role": "assistant", "content": answer}],
                "letters": letters}

    def evaluate(self, conversation, completion):
        return letter_is_correct(conversation, completion)
