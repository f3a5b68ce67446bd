"""CORE metric: aggregation against the published GPT-2 numbers, few-shot sampling, prompt formats,
per-option scoring against an independent brute-force computation, SQuAD conversion, the bundle
download path (against a local HTTP server), and base_eval end to end on the tiny model."""

import os
import io
import sys
import json
import random
import pathlib
import zipfile
import subprocess

import pytest
import torch
import torch.nn.functional as F

from nanochat import core_eval
from nanochat.common import UserError
from tests.httpserver import LocalHTTPServer, Fault

REPO = pathlib.Path(__file__).resolve().parent.parent


# -----------------------------------------------------------------------------
# Aggregation

@pytest.mark.parametrize("model", ["gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"])
def test_aggregation_reproduces_published_gpt2_results(shared_data, model):
    bundle = shared_data / "eval_core"
    tasks = core_eval.load_tasks(str(bundle))
    assert len(tasks) == 22
    ref, ref_core = core_eval.read_results_csv(bundle / "reference_results" / f"openai-community-{model}.csv")
    assert sorted(ref) == sorted(t.label for t in tasks)
    summary = core_eval.core_summary({label: acc for label, (acc, _) in ref.items()}, tasks)
    for label, (_, centered) in ref.items():
        assert summary["centered"][label] == pytest.approx(centered, abs=1e-4), label
    assert summary["tasks_used"] == 22 and summary["missing"] == []
    assert summary["core"] == pytest.approx(ref_core, abs=1e-4)
    if model == "gpt2":
        assert summary["core"] == pytest.approx(0.1139, abs=1e-4)


def test_core_leaves_out_missing_tasks_by_name(shared_data):
    tasks = core_eval.load_tasks(str(shared_data / "eval_core"))
    ref, _ = core_eval.read_results_csv(shared_data / "eval_core" / "reference_results" / "openai-community-gpt2.csv")
    accs = {label: acc for label, (acc, _) in ref.items() if label not in ("coqa", "squad")}
    summary = core_eval.core_summary(accs, tasks)
    assert summary["missing"] == ["squad", "coqa"]
    assert summary["tasks_used"] == 20 and summary["tasks_total"] == 22
    expected = sum(c for label, (_, c) in ref.items() if label in accs) / 20
    assert summary["core"] == pytest.approx(expected, abs=1e-5)


def test_centered_accuracy():
    assert core_eval.centered_accuracy(0.25, 25) == 0.0
    assert core_eval.centered_accuracy(1.0, 62) == pytest.approx(1.0)
    assert core_eval.centered_accuracy(0.5, 0) == 0.5
    assert core_eval.centered_accuracy(0.0, 50) == pytest.approx(-1.0)


def test_results_csv_round_trip(tmp_path, shared_data):
    tasks = core_eval.load_tasks(str(shared_data / "eval_core"))
    accs = {t.label: random.Random(i).random() for i, t in enumerate(tasks[:5])}
    summary = core_eval.core_summary(accs, tasks)
    path = core_eval.write_results_csv(str(tmp_path / "out.csv"), summary)
    rows, core = core_eval.read_results_csv(path)
    assert core == pytest.approx(summary["core"], abs=1e-6)
    for label, (acc, centered) in rows.items():
        assert acc == pytest.approx(accs[label], abs=1e-6)
        assert centered == pytest.approx(summary["centered"][label], abs=1e-6)


# -----------------------------------------------------------------------------
# Few-shot sampling and prompts

def test_fewshot_indices_exclude_the_item_and_are_seeded():
    n, k = 30, 10
    for idx in range(n):
        picks = core_eval.fewshot_indices(idx, n, k)
        assert len(picks) == k and len(set(picks)) == k
        assert idx not in picks and all(0 <= j < n for j in picks)
        assert picks == core_eval.fewshot_indices(idx, n, k)  # deterministic
    assert core_eval.fewshot_indices(3, n, 0) == []
    assert sorted(core_eval.fewshot_indices(0, 11, 10)) == list(range(1, 11))  # only the item is left out
    with pytest.raises(ValueError, match="cannot draw 10"):
        core_eval.fewshot_indices(0, 10, 10)
    # different items get different few-shot sets
    assert len({tuple(core_eval.fewshot_indices(i, 1000, 5)) for i in range(50)}) == 50


def test_prompt_formats():
    mc = [{"query": f"Q{i}?", "choices": [f"a{i}", f"b{i}"], "gold": i % 2} for i in range(3)]
    assert core_eval.render_prompts("multiple_choice", mc[0], mc[1:], "\nAnswer: ") == [
        "Q1?\nAnswer: b1\n\nQ2?\nAnswer: a2\n\nQ0?\nAnswer: a0",
        "Q1?\nAnswer: b1\n\nQ2?\nAnswer: a2\n\nQ0?\nAnswer: b0"]
    sc = [{"context_options": [f"x{i} he", f"x{i} she"], "continuation": f"went{i}.", "gold": 1} for i in range(2)]
    assert core_eval.render_prompts("schema", sc[0], sc[1:], " ") == [
        "x1 she went1.\n\nx0 he went0.", "x1 she went1.\n\nx0 she went0."]
    lm = [{"context": f"  C{i} is ", "continuation": f"V{i}"} for i in range(2)]
    assert core_eval.render_prompts("language_modeling", lm[0], lm[1:], " ") == [
        "C1 is V1\n\nC0 is", "C1 is V1\n\nC0 is V0"]
    with pytest.raises(ValueError, match="unknown task type"):
        core_eval.render_prompts("generative", mc[0], [], " ")


def test_crop_left_shifts_spans():
    # Every option of an item loses the same leading tokens, so all are scored in one context.
    rows, spans = core_eval.crop_left([list(range(10)), list(range(8))], [(6, 10), (6, 8)], 5)
    assert rows == [[5, 6, 7, 8, 9], [5, 6, 7]]
    assert spans == [(1, 5), (1, 3)]
    rows, spans = core_eval.crop_left([list(range(4)), list(range(3))], [(2, 4), (2, 3)], 5)  # fits: untouched
    assert rows == [[0, 1, 2, 3], [0, 1, 2]] and spans == [(2, 4), (2, 3)]
    rows, spans = core_eval.crop_left([list(range(10))], [(2, 10)], 5)  # span longer than the context
    assert spans == [(1, 5)]


def test_squad_conversion(shared_data, tmp_path):
    out = tmp_path / "squad.jsonl"
    n = core_eval.convert_squad(shared_data / "eval_core" / core_eval.SQUAD_RAW, str(out))
    assert n == 10570
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == n
    for r in rows[:200]:
        assert r["context"].startswith("Context: ") and "\nQuestion: " in r["context"]
        assert r["context"].endswith("\nAnswer:")
        passage = r["context"][len("Context: "):r["context"].index("\nQuestion: ")]
        assert r["continuation"] and r["continuation"] in passage  # SQuAD answers are spans of the passage


# -----------------------------------------------------------------------------
# Scoring against brute force

def _brute_force(model, tokenizer, task, data, idx):
    """Independent re-implementation of the protocol: prompt strings built here, one full forward
    per option, log-softmax, mean continuation loss (or greedy match)."""
    item = data[idx]
    pool = [j for j in range(len(data)) if j != idx]
    shots = [data[j] for j in random.Random(1234 + idx).sample(pool, task.num_fewshot)] if task.num_fewshot else []
    d = task.delimiter
    if task.task_type == "multiple_choice":
        head = "".join(f"{s['query']}{d}{s['choices'][s['gold']]}\n\n" for s in shots)
        prompts = [f"{head}{item['query']}{d}{c}" for c in item["choices"]]
    elif task.task_type == "schema":
        head = "".join(f"{s['context_options'][s['gold']]}{d}{s['continuation']}\n\n" for s in shots)
        prompts = [f"{head}{o}{d}{item['continuation']}" for o in item["context_options"]]
    else:
        head = "".join(f"{s['context'].strip()}{d}{s['continuation']}\n\n" for s in shots)
        prompts = [f"{head}{item['context'].strip()}{d}".strip(), f"{head}{item['context'].strip()}{d}{item['continuation']}"]
    bos = tokenizer.get_bos_token_id()
    toks = [[bos] + tokenizer.encode(p) for p in prompts]
    if task.task_type == "multiple_choice":
        start = 0
        while all(len(t) > start + 1 for t in toks) and len({t[start] for t in toks}) == 1:
            start += 1
        starts = [start] * len(toks)
    elif task.task_type == "schema":
        k = 0
        while all(len(t) > k + 1 for t in toks) and len({t[-1 - k] for t in toks}) == 1:
            k += 1
        starts = [len(t) - k for t in toks]
    else:
        assert toks[1][:len(toks[0])] == toks[0]
        toks, starts = [toks[1]], [len(toks[0])]
    cut = max(0, max(len(t) for t in toks) - model.config.sequence_len)  # the same left crop for every option
    results = []
    for t, s in zip(toks, starts):
        t, s = t[cut:], max(1, s - cut)
        logits = model(torch.tensor([t]))[0].double()
        logp = F.log_softmax(logits, dim=-1)
        if task.task_type == "language_modeling":
            results.append([int(logits[p - 1].argmax()) for p in range(s, len(t))] == t[s:])
        else:
            results.append(-sum(logp[p - 1, t[p]].item() for p in range(s, len(t))) / (len(t) - s))
    return prompts, results


def test_scoring_matches_brute_force(tiny_base, shared_data, capsys):
    from nanochat.checkpoint import load_model
    model, tokenizer, _ = load_model("base", "cpu", phase="eval")
    tasks = {t.label: t for t in core_eval.load_tasks(str(shared_data / "eval_core"))}
    shown = set()
    for label in ["arc_easy", "copa", "hellaswag", "winograd", "winogrande", "bigbench_operators", "lambada_openai"]:
        task = tasks[label]
        data = core_eval.load_task_data(task.path)
        for idx in range(3):
            correct, details = core_eval.evaluate_example(model, tokenizer, data, idx, task, "cpu")
            prompts, brute = _brute_force(model, tokenizer, task, data, idx)
            assert details["prompts"] == prompts, label
            if task.task_type == "language_modeling":
                assert correct == brute[0], label
            else:
                assert details["mean_losses"] == pytest.approx(brute, abs=1e-4), (label, idx)
                chosen = min(range(len(brute)), key=brute.__getitem__)
                if sorted(brute)[1] - sorted(brute)[0] > 1e-4:  # a near-tie may go either way
                    assert details["chosen"] == chosen, (label, idx)
                assert correct == (details["chosen"] == data[idx]["gold"])
            if task.task_type not in shown:  # show one item's few-shot prompts per task type
                shown.add(task.task_type)
                with capsys.disabled():
                    print(f"\n===== {label} ({task.task_type}, {task.num_fewshot}-shot) item {idx} =====")
                    for k, p in enumerate(prompts):
                        print(f"----- prompt {k + 1} (last 700 characters) -----\n{p[-700:]}")
                    print(f"----- scored spans {details['spans']}, per-option mean loss "
                          f"{details.get('mean_losses')}, correct={correct}")
    assert shown == set(core_eval.TASK_TYPES)


def test_long_prompts_are_cropped_to_the_context(tiny_base, shared_data):
    from nanochat.checkpoint import load_model
    model, tokenizer, _ = load_model("base", "cpu", phase="eval")
    task = {t.label: t for t in core_eval.load_tasks(str(shared_data / "eval_core"))}["arc_easy"]
    data = core_eval.load_task_data(task.path)
    _, details = core_eval.evaluate_example(model, tokenizer, data, 0, task, "cpu")
    full = tokenizer.encode(details["prompts"], prepend=tokenizer.get_bos_token_id())
    longest = max(len(f) for f in full)
    assert longest > model.config.sequence_len  # 10-shot ARC does not fit 128 tokens
    cut = longest - model.config.sequence_len
    for f, (s, e) in zip(full, details["spans"]):
        assert e == len(f) - cut and 1 <= s < e


# -----------------------------------------------------------------------------
# Getting the bundle

def _bundle_zip(shared_data, labels):
    """The official layout (one top folder eval_bundle/) with the real yaml/csv and the data of `labels`
    only, stored uncompressed (so it is a few MB: download_file saves progress per 1 MiB chunk)."""
    src = shared_data / "eval_core"
    tasks = {t.label: t for t in core_eval.load_tasks(str(src))}
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        zf.write(src / "core.yaml", "eval_bundle/core.yaml")
        zf.write(src / "eval_meta_data.csv", "eval_bundle/eval_meta_data.csv")
        for label in labels:
            zf.write(tasks[label].path, f"eval_bundle/eval_data/{tasks[label].dataset_uri}")
    return buf.getvalue()


def test_bundle_download_resumes_and_is_reused(shared_data, base_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("NANOCHAT_LOCAL_DATA", raising=False)
    www = tmp_path / "www"
    www.mkdir()
    data = _bundle_zip(shared_data, ["copa", "winograd", "boolq"])
    assert len(data) > 2 * 2**20
    (www / "eval_bundle.zip").write_bytes(data)
    with LocalHTTPServer(www) as srv:
        url = srv.url + "/eval_bundle.zip"
        # A second rank of the same machine, started first: it must wait for the bundle, not fetch it.
        env = {**os.environ, "RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2"}
        waiter = subprocess.Popen([sys.executable, "-c", f"from nanochat import core_eval; "
                                   f"print(core_eval.ensure_bundle(url={url!r}))"],
                                  cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        srv.faults["/eval_bundle.zip"] = Fault(cut_after=len(data) - 1000)  # the first response dies near the end
        monkeypatch.setattr("time.sleep", lambda s: None)
        path = core_eval.ensure_bundle(url=url, progress=False)
        assert path == str(base_dir / "eval_bundle")
        out, err = waiter.communicate(timeout=120)
        assert waiter.returncode == 0, err
        assert out.strip().splitlines()[-1] == path
        gets = srv.requests_for("/eval_bundle.zip")
        assert len(gets) == 2 and gets[0].range is None
        assert gets[1].range.startswith("bytes=") and int(gets[1].range[6:-1]) >= 2**20  # resumed, not restarted
        tasks = core_eval.load_tasks(path)
        assert [t.label for t in tasks if t.path] == ["copa", "winograd", "boolq"]
        assert len(tasks) == 22
        assert not os.path.exists(path + ".zip")  # the zip is removed once extracted
        core_eval.ensure_bundle(url=srv.url + "/eval_bundle.zip", progress=False)
        assert len(srv.requests_for("/eval_bundle.zip")) == 2  # already there: no new download


def test_bundle_download_errors_are_clear(base_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("NANOCHAT_LOCAL_DATA", raising=False)
    www = tmp_path / "www"
    www.mkdir()
    (www / "not_a_zip.zip").write_bytes(b"hello, this is not a zip file")
    with LocalHTTPServer(www) as srv:
        with pytest.raises(UserError, match="not a valid zip"):
            core_eval.ensure_bundle(url=srv.url + "/not_a_zip.zip", progress=False)
        with pytest.raises(UserError, match="404"):
            core_eval.ensure_bundle(url=srv.url + "/missing.zip", progress=False)
    assert not (base_dir / "eval_bundle").exists()
    with pytest.raises(UserError, match="--bundle-dir"):
        core_eval.ensure_bundle(str(tmp_path))


def test_local_data_bundle_converts_squad(shared_data, base_dir, monkeypatch):
    monkeypatch.setenv("NANOCHAT_LOCAL_DATA", str(shared_data))
    path = core_eval.ensure_bundle()
    assert path == str(shared_data / "eval_core")
    tasks = {t.label: t for t in core_eval.load_tasks(path)}
    assert tasks["squad"].path == str(base_dir / "eval_bundle_converted" / core_eval.SQUAD_URI)
    assert tasks["coqa"].path is None  # not available offline


# -----------------------------------------------------------------------------
# base_eval end to end

def test_base_eval_end_to_end(tiny_base, shared_data):
    from scripts import base_eval
    report = base_eval.main(["--max-per-task=2", f"--bundle-dir={shared_data / 'eval_core'}", "--split-tokens=2048",
                             "--device-batch-size=4", "--num-unconditioned=1", "--device-type=cpu"])
    assert report["core_tasks_total"] == 22 and report["core_tasks_used"] == 21
    assert report["core_missing"] == ["coqa"]
    assert all(n == 2 for n in report["core_items"].values())
    assert -1.0 < report["core"] < 1.0
    saved = json.loads((tiny_base / "report" / "base_eval.json").read_text())
    assert saved["core"] == pytest.approx(report["core"])
    assert 0 < saved["val_bpb"] < 10 and 0 < saved["train_bpb"] < 10
    assert len(saved["samples"]) == 7 and len(saved["unconditioned_samples"]) == 1
    rows, core = core_eval.read_results_csv(tiny_base / "base_eval" / f"base_model_{report['step']:06d}.csv")
    assert len(rows) == 21 and core == pytest.approx(report["core"], abs=1e-6)


def test_base_eval_rejects_bad_flags(tiny_base, shared_data):
    from scripts import base_eval
    with pytest.raises(SystemExit):
        base_eval.get_args(["--eval", "core,vibes"])
    with pytest.raises(UserError, match="unknown task"):
        base_eval.main(["--eval=core", "--tasks=copa,nonsense", f"--bundle-dir={shared_data / 'eval_core'}",
                        "--device-type=cpu"])
