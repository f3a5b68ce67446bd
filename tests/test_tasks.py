"""Tests for tasks/: slicing and mixing, the MC prompt, each dataset against the real data in
../shared/data, the CustomJSON checker, and the hub parquet loader against a local HTTP server."""

import os
import re
import json
import random
import collections

import pytest

from tasks.common import (TaskMixture, TaskSequence, render_mc, validate_conversation, extract_answer,
                          load_hub_parquet, read_jsonl, DataUnavailableError)
from nanochat.common import UserError
from tests.httpserver import LocalHTTPServer, Route


from tests.conftest import list_task as ListTask


@pytest.fixture
def local_data(shared_data, monkeypatch):
    """Tasks read ../shared/data (never the network)."""
    monkeypatch.setenv("NANOCHAT_LOCAL_DATA", str(shared_data))
    return shared_data


def sample(task, n=50, seed=0):
    idx = random.Random(seed).sample(range(len(task)), min(n, len(task)))
    return [task[i] for i in idx]


# -----------------------------------------------------------------------------
# Task, TaskMixture, TaskSequence

def test_slicing():
    items = list(range(10))
    assert list(ListTask(items)) == items
    t = ListTask(items, start=2, stop=8, step=3)
    assert len(t) == 2 and [t[0], t[1]] == [2, 5] and t[-1] == 5
    with pytest.raises(IndexError):
        t[2]
    assert len(ListTask(items, stop=100)) == 10  # stop past the end is clipped
    assert len(ListTask(items, start=10)) == 0
    with pytest.raises(ValueError):
        ListTask(items, step=0)
    with pytest.raises(TypeError):
        ListTask(items)[1:3]


def test_mixture_covers_each_example_once_deterministically():
    a, b = ListTask([("a", i) for i in range(30)]), ListTask([("b", i) for i in range(7)])
    mix = TaskMixture([a, b])
    got = list(mix)
    assert len(mix) == 37 and sorted(got) == sorted(list(a) + list(b))
    assert got != list(a) + list(b)  # shuffled, not concatenated
    assert got == list(TaskMixture([a, b]))  # same order every time
    over = collections.Counter(TaskMixture([a, b, b]))
    assert len(over) == 37 and all(over[x] == 2 for x in b) and all(over[x] == 1 for x in a)
    assert list(TaskMixture([a, b], start=5, stop=10)) == got[5:10]


def test_sequence():
    a, b, c = ListTask([1, 2, 3]), ListTask([]), ListTask([4, 5])
    seq = TaskSequence([a, b, c])
    assert len(seq) == 5 and list(seq) == [1, 2, 3, 4, 5] and seq[3] == 4 and seq[-1] == 5
    assert list(TaskSequence([a, c], step=2)) == [1, 3, 5]


def test_render_mc():
    prompt = render_mc("What is 2+2?", ["A", "B", "C"], ["3", "4", "5"])
    assert prompt == ("Multiple Choice question: What is 2+2?\n- 3=A\n- 4=B\n- 5=C\n\n"
                      "Respond only with the letter of the correct answer.")
    with pytest.raises(ValueError):
        render_mc("q", ["A"], ["x", "y"])


def test_validate_conversation_rejects_bad_shapes():
    ok = {"messages": [{"role": "system", "content": "be nice"}, {"role": "user", "content": "hi"},
                       {"role": "assistant", "content": [{"type": "text", "text": "2+2="},
                                                         {"type": "python", "text": "2+2"},
                                                         {"type": "python_output", "text": "4"}]}]}
    validate_conversation(ok)
    bad = [
        ({"messages": [{"role": "user", "content": "hi"}]}, "at least"),
        ({"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]}, "expected"),
        ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                       {"role": "user", "content": "c"}]}, "last message"),
        ({"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}, "role 'bot'"),
        ({"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "b"}]}, "empty"),
        ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "code", "text": "x"}]}]}, "part 0"),
        ({"messages": [{"role": "user", "content": ["a"]}, {"role": "assistant", "content": "b"}]}, "must be a string"),
        ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "E"}], "letters": ["A", "B"]}, "not one of the letters"),
    ]
    for conversation, reason in bad:
        with pytest.raises(ValueError, match=reason):
            validate_conversation(conversation)


# -----------------------------------------------------------------------------
# Multiple choice: ARC and MMLU

def check_mc_against_raw(task, raw_rows, choices_of, answer_index_of):
    """Every raw row appears exactly once, as its MC prompt with the letter of its correct choice."""
    expected = collections.defaultdict(list)
    for row in raw_rows:
        choices = choices_of(row)
        letters = "ABCDE"[:len(choices)]
        expected[render_mc(row["question"], letters, choices)].append(letters[answer_index_of(row)])
    seen = collections.Counter()
    for conversation in task:
        validate_conversation(conversation)
        prompt, answer = conversation["messages"][0]["content"], conversation["messages"][1]["content"]
        assert answer in expected[prompt] and conversation["letters"] == list("ABCDE"[:len(conversation["letters"])])
        seen[prompt] += 1
        assert task.evaluate(conversation, answer) and task.evaluate(conversation, f" {answer}\n")
        wrong = next(x for x in conversation["letters"] if x != answer)
        assert not task.evaluate(conversation, wrong)
    assert seen == collections.Counter({p: len(a) for p, a in expected.items()})


def test_arc(local_data):
    from tasks.arc import ARC
    for subset, split, n in [("ARC-Easy", "test", 2376), ("ARC-Challenge", "test", 1172), ("ARC-Easy", "validation", 570)]:
        task = ARC(subset, split)
        assert len(task) == n and task.eval_type == "categorical"
        raw = read_jsonl(str(local_data / "eval_chat" / "arc" / f"{subset}_{split}.jsonl"))
        check_mc_against_raw(task, raw, lambda r: r["choices"]["text"],
                             lambda r: r["choices"]["label"].index(r["answerKey"]))
    # Questions labelled 1-4 in the source are still answered with letters.
    assert all(set(c["letters"]) <= set("ABCDE") for c in ARC("ARC-Easy", "test"))
    with pytest.raises(DataUnavailableError, match="ARC-Challenge_validation.jsonl.*NANOCHAT_LOCAL_DATA"):
        ARC("ARC-Challenge", "validation")
    with pytest.raises(ValueError, match="subset"):
        ARC("ARC-Medium", "test")


def test_mmlu(local_data):
    from tasks.mmlu import MMLU
    dev = MMLU("all", "dev")
    assert len(dev) == 285 and dev.eval_type == "categorical"
    raw = read_jsonl(str(local_data / "eval_chat" / "mmlu" / "mmlu_dev.jsonl"))
    check_mc_against_raw(dev, raw, lambda r: r["choices"], lambda r: r["answer"])
    assert {c["subject"] for c in dev} == {r["subject"] for r in raw}
    test = MMLU("all", "test")
    assert len(test) == 14042
    assert len({test[i]["subject"] for i in range(100)}) > 20  # shuffled, not sorted by subject
    anatomy = MMLU("anatomy", "test")
    assert 0 < len(anatomy) < len(test) and all(c["subject"] == "anatomy" for c in anatomy)
    with pytest.raises(ValueError, match="auxiliary_train"):
        MMLU("all", "train")
    with pytest.raises(ValueError, match="no local copy"):
        MMLU("all", "auxiliary_train")
    with pytest.raises(ValueError, match="neither 'all' nor a subject"):
        MMLU("astrology", "dev")


# -----------------------------------------------------------------------------
# GSM8K

def test_gsm8k_solution_parts():
    from tasks.gsm8k import solution_parts
    parts = solution_parts("Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs.\nShe makes 9 * 2 = $<<9*2=18>>18.\n#### 18")
    assert parts == [
        {"type": "text", "text": "Janet sells 16 - 3 - 4 = "},
        {"type": "python", "text": "16-3-4"}, {"type": "python_output", "text": "9"},
        {"type": "text", "text": "9 duck eggs.\nShe makes 9 * 2 = $"},
        {"type": "python", "text": "9*2"}, {"type": "python_output", "text": "18"},
        {"type": "text", "text": "18.\n#### 18"},
    ]


def test_extract_answer():
    assert extract_answer("so #### 1,234") == "1234"
    assert extract_answer("#### -3.5.") == "-3.5"
    assert extract_answer("#### 7 and later #### 8") == "7"
    assert extract_answer("the answer is 7") is None


def test_gsm8k(local_data):
    from tasks.gsm8k import GSM8K
    train, test = GSM8K("main", "train"), GSM8K("main", "test")
    assert (len(train), len(test)) == (7473, 1319) and test.eval_type == "generative"
    raw = {r["question"]: r["answer"] for r in read_jsonl(str(local_data / "eval_chat" / "gsm8k" / "train.jsonl"))}
    for conversation in train:
        # The parts put back together are exactly the annotated solution.
        question, parts = conversation["messages"][0]["content"], conversation["messages"][1]["content"]
        text, k = "", 0
        while k < len(parts):
            if parts[k]["type"] == "python":
                assert parts[k + 1]["type"] == "python_output"
                text += f"<<{parts[k]['text']}={parts[k + 1]['text']}>>"
                k += 2
            else:
                text += parts[k]["text"]
                k += 1
        assert text == raw[question]
    for conversation in sample(test, 100):
        validate_conversation(conversation)
        answer = raw_answer = conversation["messages"][1]["content"][-1]["text"].split("#### ")[-1]
        assert test.evaluate(conversation, f"Let me think.\n#### {answer}")
        assert test.evaluate(conversation, f"#### {raw_answer.replace(',', '')}")
        assert not test.evaluate(conversation, f"#### {answer}1")
        assert not test.evaluate(conversation, answer)  # no "####": not an answer
        assert test.reward(conversation, f"#### {answer}") == 1.0
    assert len(GSM8K("socratic", "test")) == 1319


# -----------------------------------------------------------------------------
# HumanEval

def test_humaneval(local_data):
    from tasks.humaneval import HumanEval, extract_program, prompt_imports
    assert extract_program("Here:\n```python\ndef f():\n    return 1\n```\nand ```python\nx\n```") == "def f():\n    return 1\n"
    assert extract_program("```\nx = 1\n```") == "x = 1\n"
    assert extract_program("def f(): pass") == "def f(): pass"
    assert prompt_imports("from typing import List\nimport math\n\ndef f():\n    import os\n") == ["from typing import List", "import math"]
    task = HumanEval()
    assert len(task) == 164 and task.eval_type == "generative"
    for conversation in task:
        validate_conversation(conversation)
    pytest.importorskip("nanochat.execution", reason="nanochat/execution.py (the sandbox) has not landed yet")
    for conversation in sample(task, 3, seed=1):
        solution = conversation["messages"][1]["content"]
        prompt = conversation["messages"][0]["content"]
        assert task.evaluate(conversation, f"Sure:\n```python\n{solution}```\n")
        # The canonical body without the prompt's imports still passes: they are prepended.
        body = "\n".join(line for line in solution.splitlines() if not line.startswith(("import ", "from ")))
        assert task.evaluate(conversation, body)
        assert not task.evaluate(conversation, prompt + "    return None\n")
        assert not task.evaluate(conversation, "this is not python")


# -----------------------------------------------------------------------------
# SpellingBee

def test_spellingbee(local_data):
    from tasks.spellingbee import SpellingBee, split_words, TEST_SEED_OFFSET
    train_words, test_words = set(split_words("train")), set(split_words("test"))
    assert train_words.isdisjoint(test_words) and len(test_words) > 10_000 and len(train_words) > 10 * len(test_words) // 2
    train, test = SpellingBee(size=300, split="train"), SpellingBee(size=300, split="test")
    assert len(train) == 300 and test.eval_type == "generative"
    assert {train.seed(i) for i in range(300)}.isdisjoint({test.seed(i) for i in range(300)})
    assert test.seed(0) == TEST_SEED_OFFSET
    assert [train[i] for i in range(5)] == [SpellingBee(size=300, split="train")[i] for i in range(5)]
    kinds = collections.Counter()
    for task, words in ((train, train_words), (test, test_words)):
        for conversation in task:
            validate_conversation(conversation)
            question, answer = conversation["messages"][0]["content"], conversation["messages"][1]["content"]
            if isinstance(answer, str):  # spell
                kinds["spell"] += 1
                word, _, letters = answer.partition(":")
                assert word in words and word in question and letters.split(",") == list(word)
                assert not answer.startswith(" ") and ": " not in answer
                assert task.evaluate(conversation, answer) and not task.evaluate(conversation, answer[:-1])
            else:  # count
                kinds["count"] += 1
                text, call, output, final = answer
                assert (call["type"], output["type"]) == ("python", "python_output")
                m = re.fullmatch(r"'([a-z]+)'\.count\('([a-z])'\)", call["text"])
                word, letter = m.group(1), m.group(2)
                assert word in words and word in question and letter in question
                assert output["text"] == str(word.count(letter)) == str(eval(call["text"]))
                assert final["text"].endswith(f"#### {word.count(letter)}")
                assert f"{word}:{','.join(word)}" in text["text"]  # the manual spelling...
                assert text["text"].count(" hit! ") == word.count(letter)  # ...and the manual count agree
                assert f"This gives us {word.count(letter)}." in text["text"]
                assert task.evaluate(conversation, final["text"])
                assert not task.evaluate(conversation, f"#### {word.count(letter) + 1}")
                assert task.reward(conversation, f"so\n#### {word.count(letter)}") == 1.0
    assert kinds["spell"] > 100 and kinds["count"] > 100


# -----------------------------------------------------------------------------
# CustomJSON

def write_lines(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return str(path)


def test_customjson_loads_valid_file(tmp_path):
    from tasks.customjson import CustomJSON
    path = write_lines(tmp_path / "ok.jsonl", [
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
        "",
        {"messages": [{"role": "system", "content": "terse"}, {"role": "user", "content": "2+2?"},
                      {"role": "assistant", "content": [{"type": "python", "text": "2+2"},
                                                        {"type": "python_output", "text": "4"},
                                                        {"type": "text", "text": "4"}]}]},
    ])
    task = CustomJSON(path)
    assert len(task) == 2 and task[0]["messages"][1]["content"] == "hello" and task[1]["messages"][0]["role"] == "system"
    for conversation in task:
        validate_conversation(conversation)


@pytest.mark.parametrize("line, reason", [
    ('{"messages": [', "invalid JSON"),
    ('"just a string"', "got str"),
    ('{"conversation": []}', "needs a 'messages' list"),
    ('{"messages": "hi"}', "'messages' must be a list"),
    ([{"role": "user", "content": "hi"}], "at least a user and an assistant"),
    ([{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}], "role 'bot'"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "expected"),
    ([{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}], "expected"),
    ([{"role": "user", "content": ""}, {"role": "assistant", "content": "b"}], "empty content"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": 5}], "string or a list of parts"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}], "last message"),
    ([{"role": "user", "text": "a"}, {"role": "assistant", "content": "b"}], "'role' and 'content'"),
])
def test_customjson_rejects_bad_lines(tmp_path, line, reason):
    from tasks.customjson import CustomJSON
    good = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    path = write_lines(tmp_path / "bad.jsonl", [good, line, good])
    with pytest.raises(ValueError) as e:
        CustomJSON(path)
    assert f"{path}:2: " in str(e.value) and reason in str(e.value) and ":1:" not in str(e.value)


def test_customjson_collects_all_errors(tmp_path):
    from tasks.customjson import CustomJSON
    path = write_lines(tmp_path / "many.jsonl", ["not json"] * 25 + [[{"role": "user", "content": "x"}]])
    with pytest.raises(ValueError) as e:
        CustomJSON(path)
    msg = str(e.value)
    assert msg.startswith(f"26 bad line(s) in {path}") and f"{path}:20: " in msg and f"{path}:21: " not in msg
    assert "... and 6 more" in msg
    (tmp_path / "latin1.jsonl").write_bytes(b'["caf\xe9"]\n')
    with pytest.raises(ValueError, match="latin1.jsonl:1: not valid UTF-8"):
        CustomJSON(str(tmp_path / "latin1.jsonl"))
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        CustomJSON(str(tmp_path / "nope.jsonl"))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="no conversations"):
        CustomJSON(str(tmp_path / "empty.jsonl"))


# -----------------------------------------------------------------------------
# Identity and SmolTalk

def test_identity(local_data, monkeypatch):
    from tasks.identity import Identity
    task = Identity(name="Zorblax", author="Ada Lovelace", size=200, seed=3)
    assert len(task) == 200 and task.eval_type is None and len(task.templates) == 91
    text = json.dumps([task[i] for i in range(200)], ensure_ascii=False)
    assert "{{" not in text and "Zorblax" in text and "Ada Lovelace" in text
    for conversation in task:
        validate_conversation(conversation)
    assert [task[i] for i in range(10)] == [Identity("Zorblax", "Ada Lovelace", size=10, seed=3)[i] for i in range(10)]
    assert [task[i] for i in range(10)] != [Identity("Zorblax", "Ada Lovelace", size=10, seed=4)[i] for i in range(10)]
    monkeypatch.delenv("NANOCHAT_LOCAL_DATA")  # no template file: the built-in set
    builtin = Identity(name="Zorblax", author="Ada Lovelace", size=50)
    assert len(builtin.templates) < 91
    assert all("Zorblax" in json.dumps(c) or "Ada Lovelace" in json.dumps(c) for c in builtin)


def test_smoltalk_standin(local_data):
    from tasks.smoltalk import SmolTalk, normalise
    train, test = SmolTalk("train"), SmolTalk("test")
    assert len(train) > 20_000 and 0.03 < len(test) / (len(train) + len(test)) < 0.08
    for conversation in sample(train, 500) + sample(test, 200):
        validate_conversation(conversation)
    first = lambda c: next(m["content"] for m in c["messages"] if m["role"] == "user")
    assert {first(c) for c in test}.isdisjoint({first(c) for c in train})
    assert any(len(c["messages"]) > 2 for c in sample(train, 100))  # multi-turn conversations are kept
    # normalise: trims what it honestly can, drops what it can't.
    assert normalise([("assistant", "hello"), ("user", "q"), ("assistant", "a"), ("user", "more?")]) == \
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    assert normalise([("user", "q"), ("user", "q2"), ("assistant", "a")]) is None
    assert normalise([("user", "q"), ("assistant", "  ")]) is None


def test_smoltalk_as_pretraining_text(local_data, tmp_path, capsys):
    from nanochat.dataset import documents_from_file
    from tasks import smoltalk
    out = tmp_path / "chat_text" / "smoltalk_test.jsonl"
    smoltalk.main([str(out), "--split", "test"])
    test = smoltalk.SmolTalk("test")
    assert f"Wrote {len(test):,} SmolTalk test conversations" in capsys.readouterr().out
    texts = list(documents_from_file(str(out), doc_chars=0))  # what nanochat.dataset import reads
    assert len(texts) == len(test) and not os.path.exists(str(out) + ".partial")
    for conversation, text in zip(test, texts):
        paragraphs = [f"{m['role'].capitalize()}: {m['content'].strip()}" for m in conversation["messages"]]
        assert text == "\n\n".join(paragraphs)
        assert text.startswith(("User: ", "System: ")) and "\n\nAssistant: " in text
    with pytest.raises(UserError, match="must end in .jsonl"):
        smoltalk.main([str(tmp_path / "out.txt")])


def test_sample_of_every_task_is_valid(local_data):
    from tasks.arc import ARC
    from tasks.mmlu import MMLU
    from tasks.gsm8k import GSM8K
    from tasks.humaneval import HumanEval
    from tasks.smoltalk import SmolTalk
    from tasks.spellingbee import SpellingBee
    from tasks.identity import Identity
    tasks = [ARC("ARC-Challenge", "test"), MMLU("all", "test"), GSM8K("main", "train"), HumanEval(),
             SmolTalk("train"), SpellingBee(size=100, split="train"), Identity(size=100)]
    mix = TaskMixture(tasks)
    assert len(mix) == sum(len(t) for t in tasks)
    for conversation in sample(mix, 2000):
        validate_conversation(conversation)


# -----------------------------------------------------------------------------
# Data location: the hub loader and offline errors

def write_parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


ARC_ROWS = [{"id": f"q{i}", "question": f"Question {i}?", "answerKey": "BCAD"[i % 4],
             "choices": {"text": ["w", "x", "y", "z"], "label": ["A", "B", "C", "D"]}} for i in range(6)]


def serve_dataset(srv, repo, config, split, shards):
    """Put parquet shards on the fake hub and a listing of them at the hub's API path."""
    urls = []
    for n, rows in enumerate(shards):
        rel = f"files/{repo}/{config}/{split}/{n}.parquet"
        write_parquet(srv_root(srv) / rel, rows)
        urls.append(f"{srv.url}/{rel}")
    srv.routes[f"/api/datasets/{repo}/parquet/{config}/{split}"] = Route(json.dumps(urls).encode())


def srv_root(srv):
    import pathlib
    return pathlib.Path(srv.root)


@pytest.fixture
def fake_hub(tmp_path, base_dir, monkeypatch):
    monkeypatch.delenv("NANOCHAT_LOCAL_DATA", raising=False)
    (tmp_path / "www").mkdir()
    with LocalHTTPServer(tmp_path / "www") as srv:
        monkeypatch.setenv("NANOCHAT_HF_ENDPOINT", srv.url)
        yield srv


def test_hub_parquet_loader(fake_hub, base_dir):
    serve_dataset(fake_hub, "allenai/ai2_arc", "ARC-Easy", "test", [ARC_ROWS[:4], ARC_ROWS[4:]])
    table = load_hub_parquet("allenai/ai2_arc", "ARC-Easy", "test")
    assert table.to_pylist() == ARC_ROWS
    folder = base_dir / "task_data" / "allenai--ai2_arc" / "ARC-Easy" / "test"
    assert sorted(p.name for p in folder.iterdir()) == ["00000.parquet", "00001.parquet", "listing.json", "manifest.json"]
    n_requests = len(fake_hub.requests)
    assert load_hub_parquet("allenai/ai2_arc", "ARC-Easy", "test").to_pylist() == ARC_ROWS
    assert len(fake_hub.requests) == n_requests  # downloaded once, then read from disk

    # The task on top of it: shuffled rows, rendered as MC with the right letters.
    from tasks.arc import ARC
    task = ARC("ARC-Easy", "test")
    assert len(task) == 6
    for conversation in task:
        validate_conversation(conversation)
        i = int(conversation["messages"][0]["content"].split("Question ")[1].split("?")[0])
        assert conversation["messages"][1]["content"] == ARC_ROWS[i]["answerKey"]


def test_hub_smoltalk(fake_hub):
    from tasks.smoltalk import SmolTalk
    rows = [{"messages": [{"content": f"q{i}", "role": "user"}, {"content": f"a{i}", "role": "assistant"}],
             "source": "test"} for i in range(5)]
    serve_dataset(fake_hub, "HuggingFaceTB/smol-smoltalk", "default", "test", [rows])
    task = SmolTalk("test")
    assert sorted(c["messages"][0]["content"] for c in task) == [f"q{i}" for i in range(5)]
    for conversation in task:
        validate_conversation(conversation)


def test_hub_errors(fake_hub):
    from tasks.gsm8k import GSM8K
    with pytest.raises(DataUnavailableError, match="openai/gsm8k.*api/datasets/openai/gsm8k/parquet/main/test.*NANOCHAT_HF_ENDPOINT"):
        GSM8K("main", "test")  # the fake hub has no such dataset: 404
    fake_hub.routes["/api/datasets/x/y/parquet/default/train"] = Route(b'{"error": "nope"}')
    with pytest.raises(DataUnavailableError, match="did not return a list of parquet URLs"):
        load_hub_parquet("x/y", "default", "train")


def test_missing_local_data_names_the_file(tmp_path, monkeypatch):
    from tasks.humaneval import HumanEval
    from tasks.smoltalk import SmolTalk
    monkeypatch.setenv("NANOCHAT_LOCAL_DATA", str(tmp_path))
    with pytest.raises(DataUnavailableError, match=r"HumanEval.jsonl.gz not found: NANOCHAT_LOCAL_DATA=.*openai/openai_humaneval"):
        HumanEval()
    with pytest.raises(DataUnavailableError, match="chat_sft"):
        SmolTalk("train")
