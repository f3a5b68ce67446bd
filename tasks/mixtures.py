"""
The conversation mixtures that midtraining and SFT train on, and the held-out sets they are scored on,
built from the mixture flags (sizes and epochs per source; see nanochat/finetune.py for the flags).
"""

from nanochat.common import UserError, get_local_data_dir
from nanochat.chat_data import drop_overlong
from tasks.common import TaskMixture, DataUnavailableError
from tasks.arc import ARC
from tasks.mmlu import MMLU
from tasks.gsm8k import GSM8K
from tasks.smoltalk import SmolTalk
from tasks.identity import Identity
from tasks.spellingbee import SpellingBee
from tasks.customjson import CustomJSON


def build_mixtures(args, tokenizer):
    """(train task, val task, description) from the mixture flags. Offline (NANOCHAT_LOCAL_DATA set)
    MMLU has no auxiliary_train, so its small dev split stands in (with ARC train alongside)."""
    offline = get_local_data_dir() is not None
    mmlu_split = "dev" if offline else "auxiliary_train"
    try:
        parts, notes = [], {}
        if args.smoltalk_size != 0:
            smoltalk = SmolTalk("train", stop=None if args.smoltalk_size < 0 else args.smoltalk_size)
            if args.smoltalk_max_tokens > 0:  # + 1: as --max-seq-len T holds T + 1 tokens
                smoltalk, notes["smoltalk_dropped_long"] = drop_overlong(smoltalk, tokenizer, args.smoltalk_max_tokens + 1)
            parts.append(("SmolTalk train", [smoltalk]))
        if args.mmlu_epochs > 0:
            parts.append((f"MMLU {mmlu_split} x{args.mmlu_epochs}", [MMLU("all", mmlu_split)] * args.mmlu_epochs))
        if args.arc_epochs > 0:
            parts.append((f"ARC-Easy train x{args.arc_epochs}", [ARC("ARC-Easy", "train")] * args.arc_epochs))
            parts.append((f"ARC-Challenge train x{args.arc_epochs}", [ARC("ARC-Challenge", "train")] * args.arc_epochs))
        if args.gsm8k_epochs > 0:
            parts.append((f"GSM8K train x{args.gsm8k_epochs}", [GSM8K("main", "train")] * args.gsm8k_epochs))
        if args.identity_size > 0:
            parts.append(("Identity", [Identity(args.identity_name, args.identity_author, size=args.identity_size)]))
        if args.spelling_size > 0:
            parts.append(("SpellingBee train", [SpellingBee(args.spelling_size, "train")]))
        for path in args.custom_json:
            parts.append((f"CustomJSON {path}", [CustomJSON(path)]))
        # Validation mirrors the sources in the mixture, from their held-out splits.
        n = args.val_size
        val_parts = []
        if args.smoltalk_size != 0:
            val_parts.append(SmolTalk("test", stop=n))
        if args.mmlu_epochs > 0 or args.arc_epochs > 0:
            val_parts.append(MMLU("all", "test", stop=n))
        if args.gsm8k_epochs > 0:
            val_parts.append(GSM8K("main", "test", stop=n))
        if args.spelling_size > 0:
            val_parts.append(SpellingBee(n, "test"))
    except (DataUnavailableError, ValueError, FileNotFoundError) as e:
        raise UserError(f"cannot build the training mixture: {e}") from None
    tasks = [t for _, ts in parts for t in ts]
    if not tasks:
        raise UserError("the training mixture is empty: every size/epochs flag is 0")
    description = {**{name: sum(len(t) for t in ts) for name, ts in parts}, **notes}
    if offline and args.mmlu_epochs > 0:
        description["note"] = "offline: MMLU auxiliary_train is not available locally, MMLU dev is used instead"
    train = TaskMixture(tasks)
    if not val_parts:  # only custom conversations: hold nothing out, report the loss on a training slice
        description["note_val"] = "no held-out source in the mixture: validation loss is on training conversations"
        val_parts = [TaskMixture(tasks, stop=n)]
    return train, TaskMixture(val_parts), description


def chat_eval_sets(args, val_task, tokenizer, context):
    """What --chat-eval-examples measures: (prompts, spelling). prompts: the first n held-out chat
    prompts (the opening user turn of SmolTalk test conversations when SmolTalk is in the mixture, else
    of the validation mixture) whose reference reply fits in the context: where the data itself
    answers at greater length, not ending is right, and a small context would count it as a failure.
    spelling: n SpellingBee letter-count problems on held-out words, or None when SpellingBee is not
    trained on."""
    n = args.chat_eval_examples
    source = SmolTalk("test") if args.smoltalk_size != 0 else val_task
    prompts = []
    for conversation in source:
        messages = conversation["messages"]
        head = messages[:3] if messages[0]["role"] == "system" else messages[:2]  # up to the first reply
        if len(tokenizer.render_conversation({"messages": head})[0]) <= context:
            prompts.append(tokenizer.render_for_completion({"messages": head}))
            if len(prompts) == n:
                break
    spelling = SpellingBee(n, "test", count_fraction=1.0) if args.spelling_size > 0 else None
    return prompts, spelling
