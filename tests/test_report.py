"""report.py: report.md is built from report/*.json alone: header, stage sections, the metrics table,
wall time and cost, the loss plot; reset archives; missing or unknown stages are handled."""

import json
import os

import pytest

from nanochat import report
from nanochat.common import write_report_json

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _fake_run():
    """Stage summaries shaped like the scripts write them."""
    write_report_json("tok_train", {"args": {"vocab_size": 2048}, "wall_time": 12.0, "train_time": 10.5})
    write_report_json("tok_eval", {"rows": [{"text": "news", "ratio": 3.5}, {"text": "code", "ratio": 2.125}]})
    write_report_json("base_train", {"args": {"depth": 4, "num_iterations": 50}, "wall_time": 3600.0 + 125,
                                     "val_bpb": 1.2345, "num_params": 11_534_472,
                                     "losses": [9.0 - 0.1 * i for i in range(50)],
                                     "val_bpb_history": [[0, 3.0], [25, 1.6], [50, 1.2345]]})
    write_report_json("base_eval", {"wall_time": 600.0, "core": 0.0421, "core_tasks_used": 21, "core_tasks_total": 22,
                                    "core_missing": ["coqa"], "core_accuracy": {"copa": 0.55, "boolq": 0.6},
                                    "core_centered": {"copa": 0.1, "boolq": -0.0526}, "core_items": {"copa": 100, "boolq": 3270},
                                    "val_bpb": 1.25, "samples": ["The capital of France is Paris"]})
    write_report_json("chat_eval_sft", {"wall_time": 300.0, "chatcore": 0.0833, "results": {
        "ARC-Easy": {"accuracy": 0.3, "passed": 3, "total": 10, "centered": 0.0667},
        "GSM8K": {"accuracy": 0.1, "passed": 1, "total": 10, "centered": 0.1}}})
    write_report_json("chat_eval_rl", {"wall_time": 60.0, "results": {"GSM8K": {"accuracy": 0.2, "passed": 2, "total": 10, "centered": 0.2}}})
    write_report_json("my_experiment", {"wall_time": 5.0, "note": "a stage report.py does not know"})


def test_generate_builds_report_from_jsons(base_dir, tmp_path):
    report.reset()
    _fake_run()
    out = tmp_path / "cwd"
    out.mkdir()
    md = report.generate(gpu_hour_price=3.0, copy_to=str(out))
    rdir = base_dir / "report"
    assert (rdir / "report.md").read_text() == md
    # header: machine and git
    assert "## Environment" in md and "Git commit:" in md and "PyTorch" in md and "CPU:" in md
    assert "GPUs: none (CPU run)" in md
    # sections in pipeline order, unknown stage after the known ones
    order = [md.index(f"## {t}") for t in ("Tokenizer training", "Base model training", "Base model evaluation",
                                          "Chat evaluation (sft)", "Chat evaluation (rl)", "my_experiment")]
    assert order == sorted(order)
    assert "a stage report.py does not know" in md
    # settings and results of a stage
    assert "- depth: 4" in md and "- num_params: 11,534,472" in md and "- val_bpb: 1.2345" in md
    # metrics table: CORE in BASE, chat metrics in SFT / RL, '-' elsewhere
    table = md[md.index("| Metric |"):].split("\n\n")[0].splitlines()
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in table[2:]}
    assert rows["CORE"] == ["0.0421", "-", "-", "-"]
    assert rows["ARC-Easy"] == ["-", "-", "0.3000", "-"]
    assert rows["GSM8K"] == ["-", "-", "0.1000", "0.2000"]
    assert rows["ChatCORE"] == ["-", "-", "0.0833", "-"]
    assert set(rows) == {"CORE", "ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee", "ChatCORE"}
    # wall time: the sum of the stages (12 + 3725 + 600 + 300 + 60 + 5 = 4702 s)
    assert "**1h 18m 22s**" in md
    assert "CPU run: no GPU cost" in md
    # missing stages are listed
    assert "Missing stages: chat_sft" in md
    # a list of records becomes a table
    assert "| text | ratio |" in md and "| news | 3.5000 |" in md and "| code | 2.1250 |" in md
    assert "mid_train" in md.split("Not run (optional):")[1].splitlines()[0]
    # the plot
    png = rdir / "loss.png"
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 10_000
    assert "![Training loss and validation bits per byte](loss.png)" in md
    # copies in the current directory
    assert (out / "report_loss.png").read_bytes() == png.read_bytes()
    assert "](report_loss.png)" in (out / "report.md").read_text()


def test_cost_uses_gpu_count_and_price(base_dir, tmp_path):
    system = report.system_info()
    system.update(gpu_count=8, gpus=["NVIDIA H100 80GB HBM3"] * 8, gpu_memory_gb=640.0, cuda="12.8")
    write_report_json("header", {"system": system})
    write_report_json("base_train", {"wall_time": 5400.0})
    md = report.generate(gpu_hour_price=2.5, copy_to="")
    assert "8x NVIDIA H100 80GB HBM3" in md
    assert "1.50 h x 8 GPU(s) x $2.50/GPU-hour = **$30.00**" in md
    assert not (tmp_path / "report.md").exists()


def test_cpu_cost_when_priced(base_dir):
    write_report_json("base_train", {"wall_time": 7200.0})
    md = report.generate(cpu_hour_price=0.5, copy_to="")
    assert "CPU run (no GPU). Estimated cost: 2.00 h x $0.50/hour = **$1.00**" in md
    assert "No header.json" in md  # system info collected at generate time, and it says so


def test_reset_archives_the_previous_run(base_dir):
    write_report_json("base_train", {"wall_time": 1.0})
    report.generate(copy_to="")
    report.reset()
    rdir = base_dir / "report"
    assert sorted(os.listdir(rdir)) == ["archive", "header.json"]
    (archived,) = os.listdir(rdir / "archive")
    assert sorted(os.listdir(rdir / "archive" / archived)) == ["base_train.json", "report.md"]
    header = json.loads((rdir / "header.json").read_text())
    assert header["system"]["torch"] and "commit" in header["system"]["git"]


def test_empty_and_broken_reports_do_not_crash(base_dir):
    md = report.generate(copy_to="")
    assert "Missing stages: tok_train, tok_eval, base_train, base_eval, chat_sft, chat_eval_sft" in md
    assert "loss.png" not in md
    (base_dir / "report" / "base_eval.json").write_text("{ truncated")
    md = report.generate(copy_to="")
    assert "Unreadable summaries (skipped): base_eval.json" in md


def test_report_of_a_real_training_run(tiny_base, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    report.main(["generate"])
    md = (tmp_path / "report.md").read_text()
    saved = json.loads((tiny_base / "report" / "base_train.json").read_text())
    assert f"- val_bpb: {saved['val_bpb']:.4f}" in md
    assert (tmp_path / "report_loss.png").read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(SystemExit):
        report.main(["generate", "--gpu-hour-price", "-1"])
