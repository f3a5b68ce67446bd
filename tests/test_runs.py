"""The run scripts (runs/*.sh) and the sweep table (scripts/scaling_table.py): the scripts parse, say
what they do, refuse bad arguments, only pass flags the python entry points accept, and the speedrun's
base_train flags give the plan the upstream GPT-2 speedrun used. The scripts themselves are run by hand
(runcpu.sh ~22 min, the sweeps longer); these checks take seconds."""

import os
import re
import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from scripts import scaling_table

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = ["runcpu.sh", "speedrun.sh", "scaling_laws.sh", "miniseries.sh"]
# Options of the run scripts themselves and of torchrun, not of any python entry point.
OWN_FLAGS = {"--help", "--cpu", "--local-data", "--standalone", "--nproc_per_node"}


def script_text(name):
    return (REPO / "runs" / name).read_text()


def code_lines(text):
    """The script without comments and with backslash continuations joined."""
    text = text.replace("\\\n", " ")
    return [line for line in text.splitlines() if not line.lstrip().startswith("#")]


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_parses_and_has_the_required_shape(name):
    path = REPO / "runs" / name
    subprocess.run(["bash", "-n", str(path)], check=True)
    text = path.read_text()
    assert text.startswith("#!/usr/bin/env bash\n# runs/" + name)
    assert "set -euo pipefail" in text
    for var in ("NANOCHAT_BASE_DIR", "NANOCHAT_LOCAL_DATA", "WANDB_RUN"):
        assert var in text.split("set -euo pipefail")[0], f"{name}'s header does not document {var}"
    assert re.search(r"^# Time:", text, re.M), f"{name}'s header does not say how long it takes"


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_and_bad_arguments(name):
    p = subprocess.run(["bash", str(REPO / "runs" / name), "--help"], capture_output=True, text=True, timeout=30,
                       env={**os.environ, "NANOCHAT_BASE_DIR": "/nonexistent-nanochat-test"})
    assert p.returncode == 0 and "NANOCHAT_BASE_DIR" in p.stdout and "set -euo" not in p.stdout
    assert not os.path.exists("/nonexistent-nanochat-test")  # --help has no side effects
    p = subprocess.run(["bash", str(REPO / "runs" / name), "--no-such-flag"], capture_output=True, text=True, timeout=30)
    assert p.returncode == 2 and "--no-such-flag" in p.stderr


def test_bad_local_data_is_a_clear_error():
    p = subprocess.run(["bash", str(REPO / "runs" / "runcpu.sh")], capture_output=True, text=True, timeout=30,
                       env={**os.environ, "NANOCHAT_LOCAL_DATA": "/nonexistent-data-dir", "SKIP_SETUP": "1",
                            "NANOCHAT_BASE_DIR": "/nonexistent-nanochat-test"})
    assert p.returncode == 2 and "/nonexistent-data-dir is not a directory" in p.stderr


def test_gpu_scripts_use_torchrun_and_python_m():
    for name in ("speedrun.sh", "scaling_laws.sh", "miniseries.sh"):
        assert "torchrun --standalone --nproc_per_node=\"$NPROC\" -m" in script_text(name)
    for name in SCRIPTS:
        for line in code_lines(script_text(name)):
            assert not re.search(r"python\s+\S+\.py", line), f"{name} runs a file instead of python -m: {line}"


def _modules(lines):
    """(module, subcommand or None) for every python -m / torchrun -m / launch call in the script."""
    found = set()
    for line in lines:
        for m in re.finditer(r"(?:-m|launch)\s+((?:scripts|nanochat)\.\w+)(?:\s+(download|import|info|reset|generate)\b)?", line):
            found.add((m.group(1), m.group(2)))
    return found


def test_scripts_only_pass_flags_the_entry_points_accept():
    """Every --flag in the run scripts must appear in the --help of a module the script calls: flag
    renames in the python code must not silently break the long runs hours in."""
    wanted = {}
    for name in SCRIPTS:
        lines = code_lines(script_text(name))
        if "sweep_point" in script_text(name):  # what the shared sweep steps launch, the sweep launches
            lines += code_lines(script_text("common.sh"))
        flags = {f for line in lines for f in re.findall(r"(?<![\w-])(--[a-z][a-z0-9_-]*)", line)} - OWN_FLAGS
        wanted[name] = (_modules(lines), flags)
    modules = sorted({m for mods, _ in wanted.values() for m in mods}, key=str)
    # One interpreter prints every module's --help (importing torch once).
    code = ("import runpy, sys\n"
            "for mod, sub in " + repr(modules) + ":\n"
            "    sys.argv = [mod] + ([sub] if sub else []) + ['--help']\n"
            "    print('@@@', mod, sub)\n"
            "    try:\n"
            "        runpy.run_module(mod, run_name='__main__', alter_sys=True)\n"
            "    except SystemExit:\n"
            "        pass\n")
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "NANOCHAT_BASE_DIR": "/nonexistent-nanochat-test"})
    assert p.returncode == 0, p.stderr
    helps = {}
    for chunk in p.stdout.split("@@@ ")[1:]:
        head, _, body = chunk.partition("\n")
        mod, sub = head.split(" ")
        helps[(mod, None if sub == "None" else sub)] = body
    for name, (mods, flags) in wanted.items():
        assert mods, f"{name} calls no python module?"
        text = "\n".join(helps[m] for m in mods)
        unknown = sorted(f for f in flags if not re.search(re.escape(f) + r"(?![\w-])", text))
        assert not unknown, f"{name} passes flags that none of {sorted(mods, key=str)} accepts: {unknown}"


def test_speedrun_plan_matches_the_gpt2_speedrun():
    """The base_train flags in speedrun.sh, as a dry run on 8 H100s: d24 at 8 tokens per scaling param,
    the upstream plan that beats GPT-2's CORE (5,568 steps of 2^20 tokens, ~2.8e19 FLOPs)."""
    line = next(l for l in code_lines(script_text("speedrun.sh")) if l.startswith("launch scripts.base_train"))
    text = script_text("speedrun.sh")
    env = dict(re.findall(r"^(DEPTH|RATIO)=(\S+)$", text, re.M))
    flags = [f.replace("$DEPTH", env["DEPTH"]).replace("$RATIO", env["RATIO"])
             for f in line.split()[2:] if not f.startswith("--run")]
    p = subprocess.run([sys.executable, "-m", "scripts.base_train", *flags, "--dry-run", "--gpus=8", "--gpu-type=H100"],
                       cwd=REPO, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "NANOCHAT_BASE_DIR": "/nonexistent-nanochat-test"})
    assert p.returncode == 0, p.stderr
    plan = json.loads(p.stdout.strip().splitlines()[-1])
    assert plan["depth"] == 24 and plan["total_batch_size"] == 2 ** 20
    assert plan["num_iterations"] == 5568 and plan["tokens"] == 5568 * 2 ** 20
    assert 2.7e19 < plan["total_flops"] < 2.9e19
    assert 1.5 < plan["estimate"]["hours"] < 3.5
    # 16 rows x 2048 tokens x 8 GPUs must divide the batch (4 accumulation steps)
    assert plan["total_batch_size"] % (16 * plan["model_config"]["sequence_len"] * 8) == 0


# -----------------------------------------------------------------------------
# scripts/scaling_table.py


def fake_run(root, name, depth, val_bpb, core=None, budget=-1.0):
    run = root / name
    run.mkdir(parents=True)
    width = 64 * depth
    groups = {"wte": 1000, "value_embeds": 0, "lm_head": 1000, "transformer_matrices": 12 * depth * width * width,
              "scalars": depth}
    groups["total"] = sum(groups.values())
    groups["scaling"] = groups["transformer_matrices"] + groups["lm_head"]
    (run / "base_train.json").write_text(json.dumps({
        "stage": "base_train", "depth": depth, "model_config": {"n_embd": width}, "num_params_by_group": groups,
        "tokens": 4096 * 10 * depth, "total_training_flops": 1e12 * depth, "val_bpb": val_bpb,
        "total_training_time": 30.0 * depth, "args": {"target_flops": budget}}))
    if core is not None:
        (run / "base_eval.json").write_text(json.dumps({"stage": "base_eval", "core": core, "core_tasks_used": 21}))
    return groups


def test_scaling_table_collects_and_sorts(tmp_path, capsys):
    fake_run(tmp_path, "sl_f3e12_d2", 2, 1.9, core=0.01, budget=3e12)
    g1 = fake_run(tmp_path, "sl_f1e12_d4", 4, 2.3, core=0.02, budget=1e12)
    fake_run(tmp_path, "sl_f1e12_d1", 1, 2.5, budget=1e12)  # CORE not measured
    (tmp_path / "not_a_run").mkdir()
    (tmp_path / "stray.txt").write_text("x")
    rows = scaling_table.main([str(tmp_path), "--title", "test sweep"])
    assert [r["run"] for r in rows] == ["sl_f1e12_d1", "sl_f1e12_d4", "sl_f3e12_d2"]
    d4 = rows[1]
    assert d4["params"] == g1["total"] and d4["scaling_params"] == g1["scaling"]
    assert d4["tokens_per_param"] == pytest.approx(4096 * 40 / g1["scaling"])
    assert d4["core"] == 0.02 and rows[0]["core"] is None
    md = (tmp_path / "table.md").read_text()
    assert md.startswith("# test sweep\n")
    lines = [l for l in md.splitlines() if l.startswith("| sl_")]
    assert len(lines) == 3 and "| 1e+12 | 4 | 256 |" in lines[1] and "| 2.3000 | 0.0200 (21 tasks) |" in lines[1]
    assert lines[0].split("|")[11].strip() == "-"  # the CORE cell of the run without base_eval.json
    assert "| sl_f1e12_d4 |" in capsys.readouterr().out
    with open(tmp_path / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["run"] for r in table] == ["sl_f1e12_d1", "sl_f1e12_d4", "sl_f3e12_d2"]
    assert float(table[2]["val_bpb"]) == 1.9 and table[0]["core"] == ""


def test_scaling_table_clear_errors(tmp_path):
    with pytest.raises(SystemExit, match="is not a directory"):
        scaling_table.main([str(tmp_path / "missing")])
    with pytest.raises(SystemExit, match="no <run>/base_train.json"):
        scaling_table.main([str(tmp_path)])
    (tmp_path / "r1").mkdir()
    (tmp_path / "r1" / "base_train.json").write_text("{not json")
    with pytest.raises(SystemExit, match="not valid JSON"):
        scaling_table.main([str(tmp_path)])
