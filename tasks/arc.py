"""ARC (AI2 Reasoning Challenge): grade-school science multiple choice, Easy and Challenge subsets.
Source: HuggingFace `allenai/ai2_arc`; locally eval_chat/arc/{subset}_{split}.jsonl in the same schema.
"""

from tasks.common import MultipleChoiceTask, mc_conversation, load_rows, shuffled, check_choice

SUBSETS = ("ARC-Easy", "ARC-Challenge")
SPLITS = ("train", "validation", "test")


class ARC(MultipleChoiceTask):
    def __init__(self, subset="ARC-Easy", split="test", **kwargs):
        super().__init__(**kwargs)
        check_choice("ARC subset", subset, SUBSETS)
        check_choice("ARC split", split, SPLITS)
        self.subset, self.split = subset, split
        self.rows = shuffled(load_rows(f"eval_chat/arc/{subset}_{split}.jsonl", "allenai/ai2_arc", subset, split))

    def get_example(self, index):
        row = self.rows[index]
        # About 4% of questions are labelled 1-4 instead of A-D; every question gets letters (by
        # position), so the model only ever answers with A, B, C, ...
        answer = row["choices"]["label"].index(row["answerKey"])
        return mc_conversation(row["question"], row["choices"]["text"], answer)
