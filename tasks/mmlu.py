"""MMLU: 57-subject multiple choice (4 options). Source: HuggingFace `cais/mmlu`, config "all";
locally eval_chat/mmlu/mmlu_{dev,test}.jsonl ({subject, question, choices, answer}).
`subset` is "all" or one subject name (e.g. "anatomy").
"""

from nanochat.common import get_local_data_dir
from tasks.common import MultipleChoiceTask, mc_conversation, load_rows, shuffled, check_choice

SPLITS = ("auxiliary_train", "validation", "dev", "test")
LOCAL_SPLITS = ("dev", "test")


class MMLU(MultipleChoiceTask):
    def __init__(self, subset="all", split="test", **kwargs):
        super().__init__(**kwargs)
        if split == "train":  # upstream nanochat once asked for "train", which does not exist
            raise ValueError("MMLU has no 'train' split: its training split is 'auxiliary_train'")
        check_choice("MMLU split", split, SPLITS)
        if get_local_data_dir() is not None and split not in LOCAL_SPLITS:
            raise ValueError(f"MMLU split {split!r} has no local copy (NANOCHAT_LOCAL_DATA has only "
                             f"{LOCAL_SPLITS}); unset NANOCHAT_LOCAL_DATA to download it from cais/mmlu")
        self.subset, self.split = subset, split
        rows = load_rows(f"eval_chat/mmlu/mmlu_{split}.jsonl", "cais/mmlu", "all", split)
        if rows and isinstance(rows[0].get("train"), dict):
            rows = [r["train"] for r in rows]  # auxiliary_train rows were once nested under "train"
        if subset != "all":
            subjects = sorted({r["subject"] for r in rows})
            rows = [r for r in rows if r["subject"] == subset]
            if not rows:
                raise ValueError(f"MMLU subset {subset!r} is neither 'all' nor a subject of split "
                                 f"{split!r}: {', '.join(subjects)}")
        self.rows = shuffled(rows)

    def get_example(self, index):
        row = self.rows[index]
        return mc_conversation(row["question"], row["choices"], row["answer"], subject=row["subject"])
