"""SpellingBee: synthetic spelling and letter counting ("How many r are in strawberry?"), the skill a
token-level model is worst at because it never sees letters. Two kinds of examples, from a word list
(locally misc/english_words/words_alpha.txt, else the dwyl/english-words list from GitHub):
  spell: "Spell the word: apple" -> "apple:a,p,p,l,e"
  count: "How many r are in strawberry?" -> spell the word, walk its letters keeping a count, check
         with the python tool ('strawberry'.count('r') -> 3), and end with "#### 3".
Each example comes from its own random.Random(seed): seed = index for train, 10,000,000 + index for
test (seeds -(i+1) would collide, since Random(-x) == Random(x)). The splits draw from disjoint parts of
the word list (90/10 by a hash of the word), so test words are never trained on. Targets never start
with a space: "apple:a,p,..." must tokenize the same as the model will write it.
"""

import os
import zlib
import random
import functools

from nanochat.common import get_base_dir, download_file, DownloadError
from tasks.common import Task, local_data_path, extract_answer, last_text, check_choice, DataUnavailableError

WORDS_URL = "https://raw.githubusercontent.com/dwyl/english-words/master/words_alpha.txt"
SPLITS = ("train", "test")
TEST_SEED_OFFSET = 10_000_000
TEST_WORD_FRACTION = 0.1  # of the word list held out for the test split

SPELL_TEMPLATES = [
    "Spell the word: {word}", "Spell {word}", "How do you spell {word}?", "Can you spell {word} letter by letter?",
    "Spell out the word {word} for me.", "What are the letters in {word}?", "Deletrea la palabra {word}",
    "Épelle le mot {word}", "Buchstabiere das Wort {word}"]

COUNT_TEMPLATES = [
    "How many {letter} are in {word}?", "How many {letter}s are in the word {word}?",
    "How many times does the letter {letter} appear in {word}?", "Count the number of {letter} in {word}",
    "Count how many times {letter} occurs in {word}", "In the word {word}, how many {letter} are there?",
    "What is the count of letter {letter} in {word}?", "How often does {letter} show up in {word}?",
    "Number of {letter} in {word}?", "Tell me how many {letter} letters {word} has.",
    "Does {word} have a lot of {letter}? How many exactly?", "¿Cuántas {letter} hay en {word}?",
    "Combien de {letter} y a-t-il dans {word} ?", "Wie viele {letter} sind in {word}?",
    "{word}에 {letter}가 몇 개 있나요?", "{word}里有几个{letter}?", "{word}に{letter}はいくつありますか?"]


@functools.lru_cache(maxsize=1)
def load_words():
    """The word list (lower-case a-z words), from the local data folder or downloaded once."""
    path = local_data_path("misc/english_words/words_alpha.txt", WORDS_URL)
    if path is None:
        path = os.path.join(get_base_dir(), "task_data", "words_alpha.txt")
        try:
            download_file(WORDS_URL, path)
        except DownloadError as e:
            raise DataUnavailableError(f"could not download the word list from {WORDS_URL}: {e}. Put "
                                       f"words_alpha.txt at {path}, or set NANOCHAT_LOCAL_DATA.") from e
    with open(path, encoding="utf-8") as f:
        return [w for w in map(str.strip, f) if w.isascii() and w.isalpha() and w.islower()]


@functools.lru_cache(maxsize=2)
def split_words(split):
    """The words of a split, by a stable hash (crc32: Python's hash() changes every run)."""
    return [w for w in load_words() if (zlib.crc32(w.encode()) % 1000 < TEST_WORD_FRACTION * 1000) == (split == "test")]


def spelled(word):
    return f"{word}:{','.join(word)}"


def _quote(rng, s):
    q = rng.choice(["", "'", '"'])
    return f"{q}{s}{q}"


def spell_example(rng, word):
    return {"messages": [{"role": "user", "content": rng.choice(SPELL_TEMPLATES).format(word=word)},
                         {"role": "assistant", "content": spelled(word)}]}


def count_example(rng, word):
    # Mostly a letter from the word; sometimes any letter, so "0" is a possible answer.
    letter = rng.choice(word) if rng.random() < 0.9 else rng.choice("abcdefghijklmnopqrstuvwxyz")
    question = rng.choice(COUNT_TEMPLATES).format(letter=_quote(rng, letter), word=_quote(rng, word))
    if rng.random() < 0.3:
        question = question.lower()
    if rng.random() < 0.5:
        question = question.rstrip("?")  # people often leave the question mark off
    count = word.count(letter)
    # The manual walk: one line per letter, "i:c" with no space (the same tokens as the spelling).
    lines = [f"{i}:{c} hit! count={word[:i].count(letter)}" if c == letter else f"{i}:{c}"
             for i, c in enumerate(word, 1)]
    manual = (f"Let me spell the word out first:\n{spelled(word)}\n\n"
              f"Now I go through it letter by letter, counting the letter {letter}:\n" + "\n".join(lines) +
              f"\n\nThis gives us {count}.\n\nLet me double check with Python:\n\n")
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": [
        {"type": "text", "text": manual}, {"type": "python", "text": f"'{word}'.count('{letter}')"},
        {"type": "python_output", "text": str(count)},
        {"type": "text", "text": f"\n\nBoth agree. My final answer is:\n\n#### {count}"}]}]}


class SpellingBee(Task):
    eval_type = "generative"

    def __init__(self, size=1000, split="train", count_fraction=0.5, **kwargs):
        super().__init__(**kwargs)
        check_choice("SpellingBee split", split, SPLITS)
        if size < 0:
            raise ValueError(f"SpellingBee size must be >= 0, got {size}")
        self.size, self.split, self.count_fraction = size, split, count_fraction
        self.words, self.rows = split_words(split), range(size)  # example i is generated from seed i

    def seed(self, index):
        return index if self.split == "train" else TEST_SEED_OFFSET + index

    def get_example(self, index):
        rng = random.Random(self.seed(index))
        word = rng.choice(self.words)
        return (count_example if rng.random() < self.count_fraction else spell_example)(rng, word)

    def evaluate(self, conversation, completion):
        """Spelling: the completion is exactly "word:w,o,r,d". Counting: its "#### n" is the count."""
        reference = conversation["messages"][-1]["content"]
        if isinstance(reference, str):
            return completion.strip() == reference
        predicted = extract_answer(completion)
        return predicted is not None and predicted == extract_answer(last_text(reference))
