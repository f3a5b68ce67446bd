"""CustomJSON: your own conversations from a .jsonl file, one per line: a JSON array of messages
[{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}, ...] or {"messages": [...]},
in the format of nanochat/tokenizer.py, ending with the assistant. The whole file is checked up front and
every bad line reported in one error, so a file can be fixed in one go instead of one crash at a time.
"""

import os
import json

from tasks.common import Task, validate_conversation

MAX_LISTED_ERRORS = 20


def parse_line(line):
    """One line -> a conversation dict; ValueError saying why the line is not one."""
    try:
        row = json.loads(line.rstrip())  # without the newline, so an unclosed line's error column is its end
    except json.JSONDecodeError as e:
        raise ValueError(f"invalid JSON ({e.msg} at column {e.colno})")
    if not isinstance(row, (dict, list)):
        raise ValueError(f"expected a JSON array of messages or an object with 'messages', got {type(row).__name__}")
    if isinstance(row, dict) and "messages" not in row:
        raise ValueError("an object line needs a 'messages' list")
    messages = row["messages"] if isinstance(row, dict) else row
    if not isinstance(messages, list):
        raise ValueError(f"'messages' must be a list, got {type(messages).__name__}")
    return validate_conversation({"messages": [
        {"role": m["role"], "content": m["content"]} if isinstance(m, dict) and "role" in m and "content" in m else m
        for m in messages]})


class CustomJSON(Task):
    def __init__(self, filepath, **kwargs):
        super().__init__(**kwargs)
        if not os.path.isfile(filepath):
            raise FileNotFoundError(f"CustomJSON: {filepath} does not exist (expected a .jsonl file of conversations)")
        self.filepath, self.rows, errors = filepath, [], []
        with open(filepath, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                try:
                    self.rows.append(parse_line(raw.decode("utf-8")))
                except UnicodeDecodeError:
                    errors.append(f"{filepath}:{lineno}: not valid UTF-8 text")
                except ValueError as e:
                    errors.append(f"{filepath}:{lineno}: {e}")
        if errors:
            more = len(errors) - MAX_LISTED_ERRORS
            raise ValueError(f"{len(errors)} bad line(s) in {filepath}:\n" + "\n".join(errors[:MAX_LISTED_ERRORS]) +
                             (f"\n... and {more} more" if more > 0 else ""))
        if not self.rows:
            raise ValueError(f"{filepath} has no conversations")
