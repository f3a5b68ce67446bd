"""
The report card of a run: report/report.md, built only from the report/<stage>.json summaries every
script writes (nanochat.common.write_report_json), plus a plot of the loss and bpb curves (loss.png).

    python -m nanochat.report reset                           # first: archive the last run, record this machine
    python -m nanochat.report generate --gpu-hour-price 3.0   # at the end

generate writes the machine, headline metrics per stage (BASE / MID / SFT / RL), wall times and cost,
one section per stage (settings, results), and copies report.md (and the plot, as report_loss.png) to
the current directory. Missing stages are listed, never fatal; unknown stages follow the known ones.
"""

import os
import json
import math
import glob
import shutil
import platform
import argparse
import datetime
import itertools

from nanochat.common import report_dir, git_info, run_cli, write_report_json, atomic_write_bytes

# Known stages in pipeline order, with their section titles.
STAGES = {"tok_train": "Tokenizer training", "tok_eval": "Tokenizer evaluation", "base_train": "Base model training",
          "base_eval": "Base model evaluation", "chat_eval_base": "Chat evaluation (base)", "mid_train": "Midtraining",
          "chat_eval_mid": "Chat evaluation (mid)", "chat_sft": "Chat SFT", "chat_eval_sft": "Chat evaluation (sft)",
          "chat_rl": "Chat RL", "chat_eval_rl": "Chat evaluation (rl)"}
# Stages a complete run has; the others (base/mid chat evals, midtraining, RL) are optional.
REQUIRED = ("tok_train", "tok_eval", "base_train", "base_eval", "chat_sft", "chat_eval_sft")
COLUMNS = (("BASE", "base"), ("MID", "mid"), ("SFT", "sft"), ("RL", "rl"))
CHAT_METRICS = ("ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee")
# Keys shown in their own way (tables, plot) or not at all, rather than in the generic result list.
SPECIAL_KEYS = {"stage", "timestamp", "git", "command", "args", "losses", "val_bpb_history", "wall_time",
                "samples", "unconditioned_samples", "results", "core_accuracy", "core_centered", "core_items",
                "core_seconds", "system"}


def system_info():
    """What the run ran on: CPU, cores, RAM, GPUs, software versions, git commit and dirty flag."""
    import torch
    import psutil
    try:
        with open("/proc/cpuinfo") as f:
            cpu = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    except OSError:
        cpu = []
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    vram = sum(torch.cuda.get_device_properties(i).total_memory for i in range(len(gpus))) / 2**30 if gpus else 0.0
    return {"platform": platform.platform(), "cpu": cpu[0] if cpu else platform.processor() or platform.machine(),
            "cpu_cores_physical": psutil.cpu_count(logical=False), "cpu_cores_logical": psutil.cpu_count(logical=True),
            "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "gpu_count": len(gpus), "gpus": gpus, "gpu_memory_gb": round(vram, 1),
            "cuda": torch.version.cuda if gpus else None,
            "python": platform.python_version(), "torch": torch.__version__, "git": git_info()}


def reset():
    """Archive the previous run's summaries and start a new report with a header."""
    rdir = report_dir()
    old = sorted(glob.glob(os.path.join(rdir, "*.json")))
    old += [p for p in (os.path.join(rdir, "report.md"), os.path.join(rdir, "loss.png")) if os.path.exists(p)]
    if old:
        archive = os.path.join(rdir, "archive", datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
        os.makedirs(archive, exist_ok=True)
        for p in old:
            shutil.move(p, os.path.join(archive, os.path.basename(p)))
        print(f"Archived {len(old)} file(s) of the previous report to {archive}")
    path = write_report_json("header", {"system": system_info()})
    print(f"Started a new report: {path}")
    return path


def fmt_duration(seconds):
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}h {m:02d}m {s:02d}s" if h else (f"{m}m {s:02d}s" if m else f"{s}s")


def fmt_value(v):
    """One value as short text: 4 decimals for floats, thousands separators for big ints, small dicts
    and lists inline, long lists summarised."""
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, int):
        return f"{v:,}" if abs(v) >= 10_000 else str(v)
    if isinstance(v, float) and math.isfinite(v):
        return f"{v:.3e}" if v != 0 and (abs(v) >= 1e6 or abs(v) < 1e-3) else f"{v:.4f}"
    if isinstance(v, dict):
        flat = len(v) <= 16 and all(not isinstance(x, (dict, list)) for x in v.values())
        return ", ".join(f"{k}={fmt_value(x)}" for k, x in v.items()) if flat else f"({len(v)} entries)"
    if isinstance(v, list):
        flat = len(v) <= 10 and all(not isinstance(x, (dict, list)) for x in v)
        return "[" + ", ".join(fmt_value(x) for x in v) + "]" if flat else f"({len(v)} values)"
    return str(v)


def stage_seconds(data):
    """A stage's duration: wall_time (write_report_json's convention), else an older spelling; or None."""
    times = [data.get(k) for k in ("wall_time", "wall_time_s", "train_time_s", "train_time")]
    return next((float(t) for t in times if isinstance(t, (int, float)) and not isinstance(t, bool)), None)


def _is_table(v):
    """A non-empty list of flat dicts that share their keys: shown as a markdown table."""
    return (isinstance(v, list) and 0 < len(v) <= 200 and all(isinstance(r, dict) for r in v)
            and all(list(r) == list(v[0]) for r in v)
            and all(not isinstance(x, (dict, list)) for r in v for x in r.values()))


def md_table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def load_summaries(rdir):
    """{stage: summary dict} for every report/*.json, and the names of files that could not be read."""
    summaries, unreadable = {}, []
    for path in sorted(glob.glob(os.path.join(rdir, "*.json"))):
        try:
            with open(path) as f:
                data = json.load(f)
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
            summaries[os.path.basename(path)[:-len(".json")]] = data
        except (OSError, ValueError) as e:
            unreadable.append(f"{os.path.basename(path)} ({e})")
    return summaries, unreadable


def _git_line(git):
    return f"- Git commit: {git.get('commit', 'unknown')} ({'dirty' if git.get('dirty') else 'clean'})"


def section_header(system, started, note):
    names = ", ".join(sorted(set(system.get("gpus", []))))
    gpus = (f"{system['gpu_count']}x {names} ({system.get('gpu_memory_gb')} GB total), CUDA {system.get('cuda')}"
            if system.get("gpu_count") else "none (CPU run)")
    return "\n".join(["## Environment", ""] + ([f"_{note}_", ""] if note else []) + [
        _git_line(system.get("git", {})),
        f"- Platform: {system.get('platform', '-')}",
        f"- CPU: {system.get('cpu', '-')} ({system.get('cpu_cores_physical', '-')} physical / "
        f"{system.get('cpu_cores_logical', '-')} logical cores)",
        f"- RAM: {system.get('ram_gb', '-')} GB",
        f"- GPUs: {gpus}",
        f"- Python {system.get('python', '-')}, PyTorch {system.get('torch', '-')}",
    ] + ([f"- Run started: {started}"] if started else []))


def section_stage(stage, data):
    lines = [f"## {STAGES.get(stage, stage)}", "", f"- Finished: {data.get('timestamp', '-')}"]
    if stage_seconds(data) is not None:
        lines.append(f"- Wall time: {fmt_duration(stage_seconds(data))}")
    if data.get("command"):
        lines.append(f"- Command: `{data['command']}`")
    if isinstance(data.get("git"), dict):
        lines.append(_git_line(data["git"]))
    settings = data["args"] if isinstance(data.get("args"), dict) else {}
    results = {k: v for k, v in data.items() if k not in SPECIAL_KEYS and not _is_table(v)}
    for title, items in (("Settings", settings), ("Results", results)):
        if items:
            lines += ["", f"{title}:", ""] + [f"- {k}: {fmt_value(v)}" for k, v in items.items()]
    for k, v in data.items():  # lists of records (e.g. tok_eval's comparison rows) become tables
        if k not in SPECIAL_KEYS and _is_table(v):
            header = list(v[0])
            lines += ["", f"{k}:", "", md_table(header, [[fmt_value(r.get(h)) for h in header] for r in v])]
    if "core_centered" in data:
        rows = [(label, f"{data.get('core_accuracy', {}).get(label, float('nan')):.4f}", f"{c:+.4f}",
                 fmt_value(data.get("core_items", {}).get(label, "-")))
                for label, c in data["core_centered"].items()]
        lines += ["", f"CORE {data.get('core', float('nan')):.4f} over {data.get('core_tasks_used', len(rows))} of "
                      f"{data.get('core_tasks_total', '?')} tasks"
                      + (f" (no data: {', '.join(data['core_missing'])})" if data.get("core_missing") else "") + ":", "",
                  md_table(["Task", "Accuracy", "Centered", "Items"], rows)]
    if isinstance(data.get("results"), dict) and stage.startswith("chat_eval"):
        rows = [(name, r.get("passed", "-"), r.get("total", "-"), f"{r.get('accuracy', float('nan')):.4f}",
                 f"{r.get('centered', float('nan')):+.4f}",
                 f"{r['prompt_too_long']} prompt(s) longer than the context" if r.get("prompt_too_long") else "")
                for name, r in data["results"].items()]
        lines += ["", md_table(["Task", "Passed", "Evaluated", "Accuracy", "Centered", "Note"], rows)]
        if data.get("chatcore") is not None:
            lines += ["", f"ChatCORE: {data['chatcore']:.4f}"]
    for key, label in (("samples", "Samples"), ("unconditioned_samples", "Unconditioned samples")):
        if data.get(key):
            lines += ["", f"{label}:", "", "```"] + [str(s).replace("```", "'''") for s in data[key]] + ["```"]
    return "\n".join(lines)


def metrics_table(summaries):
    """Headline metrics per stage; '-' where a stage did not run or did not report the metric."""
    def cell(v):
        return f"{v:.4f}" if isinstance(v, (int, float)) else "-"
    core = summaries.get("base_eval", {}).get("core")
    evals = [summaries.get(f"chat_eval_{source}", {}) for _, source in COLUMNS]
    rows = ([["CORE"] + [cell(core if source == "base" else None) for _, source in COLUMNS]]
            + [[m] + [cell(ev.get("results", {}).get(m, {}).get("accuracy")) for ev in evals] for m in CHAT_METRICS]
            + [["ChatCORE"] + [cell(ev.get("chatcore")) for ev in evals]])
    return md_table(["Metric"] + [c for c, _ in COLUMNS], rows)


def plot_curves(summaries, path):
    """Training loss (raw and smoothed) and validation bpb of every stage that logged them; True if any."""
    curves = [(s, d) for s, d in summaries.items()
              if isinstance(d.get("losses"), list) or isinstance(d.get("val_bpb_history"), list)]
    if not curves:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax_loss, ax_bpb) = plt.subplots(1, 2, figsize=(12, 4.5))
    for stage, d in curves:
        losses = [x for x in d.get("losses") or [] if isinstance(x, (int, float))]
        if losses:
            steps = list(range(1, len(losses) + 1))
            line, = ax_loss.plot(steps, losses, alpha=0.3, linewidth=0.8)
            smooth = list(itertools.accumulate(losses, lambda avg, x: 0.9 * avg + 0.1 * x))
            ax_loss.plot(steps, smooth, color=line.get_color(), label=f"{stage} (EMA 0.9)")
        hist = [h for h in d.get("val_bpb_history") or [] if isinstance(h, (list, tuple)) and len(h) == 2]
        if hist:
            ax_bpb.plot([h[0] for h in hist], [h[1] for h in hist], marker="o", label=stage)
    ax_loss.set(title="Training loss", xlabel="step", ylabel="loss (nats/token)")
    ax_bpb.set(title="Validation bits per byte", xlabel="step", ylabel="bpb")
    for ax in (ax_loss, ax_bpb):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return True


def generate(gpu_hour_price=3.0, cpu_hour_price=0.0, copy_to=None):
    """report/report.md (and loss.png) from report/*.json, copied to `copy_to` (default: the current
    directory, "" for none); returns the markdown."""
    rdir = report_dir()
    summaries, unreadable = load_summaries(rdir)
    header = summaries.pop("header", None)
    if header and isinstance(header.get("system"), dict):
        system, started, note = header["system"], header.get("timestamp"), None
    else:
        system, started = system_info(), None
        note = "No header.json: this machine information was collected at generate time (run " \
               "`python -m nanochat.report reset` at the start of a run to record it)."
    # Known stages in pipeline order, then the others.
    stages = [s for s in STAGES if s in summaries] + sorted(s for s in summaries if s not in STAGES)
    missing = [s for s in STAGES if s not in summaries]

    parts = ["# nanochat training report", "", f"Generated: {datetime.datetime.now().isoformat(timespec='seconds')}",
             "", section_header(system, started, note)]
    # Summary first: it is what people look for.
    wall = {s: stage_seconds(summaries[s]) for s in stages if stage_seconds(summaries[s]) is not None}
    total, gpus = sum(wall.values()), system.get("gpu_count") or 0
    parts += ["", "## Summary", "", metrics_table(summaries), ""]
    parts += [md_table(["Stage", "Wall time"], [(STAGES.get(s, s), fmt_duration(t)) for s, t in wall.items()]
                       + [("**Total**", f"**{fmt_duration(total)}**")]), ""]
    hours = total / 3600
    if gpus:
        cost = f"Estimated cost: {hours:.2f} h x {gpus} GPU(s) x ${gpu_hour_price:.2f}/GPU-hour = "
        parts.append(cost + f"**${hours * gpus * gpu_hour_price:,.2f}**")
    elif cpu_hour_price > 0:
        cost = f"CPU run (no GPU). Estimated cost: {hours:.2f} h x ${cpu_hour_price:.2f}/hour = "
        parts.append(cost + f"**${hours * cpu_hour_price:,.2f}**")
    else:
        parts.append(f"CPU run: no GPU cost ({hours:.2f} h wall time; pass --cpu-hour-price to price the machine).")
    for label, names in (("Missing stages", [s for s in missing if s in REQUIRED]),
                         ("Not run (optional)", [s for s in missing if s not in REQUIRED]),
                         ("Unreadable summaries (skipped)", unreadable)):
        if names:
            parts += ["", f"{label}: {', '.join(names)}"]
    png = os.path.join(rdir, "loss.png")
    if plot_curves(summaries, png):
        parts += ["", "![Training loss and validation bits per byte](loss.png)"]
    elif os.path.exists(png):
        os.remove(png)  # a plot from an earlier report would now be stale
    for stage in stages:
        parts += ["", section_stage(stage, summaries[stage])]
    md = "\n".join(parts) + "\n"
    out = os.path.join(rdir, "report.md")
    atomic_write_bytes(out, md.encode("utf-8"))
    print(f"Wrote {out}")
    copy_to = os.getcwd() if copy_to is None else copy_to
    if copy_to and os.path.realpath(copy_to) != os.path.realpath(rdir):
        if os.path.exists(png):
            shutil.copyfile(png, os.path.join(copy_to, "report_loss.png"))
        copy_md = md.replace("](loss.png)", "](report_loss.png)")
        atomic_write_bytes(os.path.join(copy_to, "report.md"), copy_md.encode("utf-8"))
        print(f"Copied to {os.path.join(copy_to, 'report.md')}")
    return md


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("reset", help="archive the previous run's summaries and record this machine in header.json")
    g = sub.add_parser("generate", help="write report/report.md (+ loss.png) from report/*.json and copy it here")
    g.add_argument("--gpu-hour-price", type=float, default=3.0,
                   help="$ per GPU-hour for the cost estimate (default 3.0, an H100's on-demand price)")
    g.add_argument("--cpu-hour-price", type=float, default=0.0,
                   help="$ per hour of the machine for CPU-only runs (default 0: not priced)")
    g.add_argument("--no-copy", action="store_true", help="do not copy report.md to the current directory")
    args = p.parse_args(argv)
    if args.command == "reset":
        return reset()
    if args.gpu_hour_price < 0 or args.cpu_hour_price < 0:
        p.error("prices must be >= 0")
    return generate(args.gpu_hour_price, args.cpu_hour_price, copy_to="" if args.no_copy else None)


if __name__ == "__main__":
    run_cli(main)
