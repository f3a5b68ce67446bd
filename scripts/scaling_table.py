"""One table from a sweep of base models: runs/scaling_laws.sh and runs/miniseries.sh copy each run's
report/base_train.json (and report/base_eval.json, when CORE was measured) into <results dir>/<run>/; this
reads them all and writes a markdown table (table.md: rows by FLOPs budget, then depth; CORE "-" where not
measured) and the raw numbers (results.csv) there.

    python -m scripts.scaling_table ~/.cache/nanochat/scaling_laws_results_cpu
"""

import os
import csv
import json
import argparse

COLUMNS = ["run", "budget", "depth", "width", "params", "scaling_params", "tokens", "tokens_per_param", "flops",
           "val_bpb", "core", "core_tasks", "train_min"]


def _load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (FileNotFoundError, NotADirectoryError):  # not a run: no base_train.json, or table.md, logs
        return None
    except ValueError as e:
        raise SystemExit(f"{path} is not valid JSON ({e}); delete it or rerun that training run")


def collect(results_dir):
    """One dict per <results_dir>/<run>/base_train.json, with CORE from base_eval.json when present."""
    if not os.path.isdir(results_dir):
        raise SystemExit(f"{results_dir} is not a directory: pass the results folder a sweep script wrote")
    rows = []
    for run in sorted(os.listdir(results_dir)):
        train = _load(os.path.join(results_dir, run, "base_train.json"))
        if train is None:
            continue
        ev = _load(os.path.join(results_dir, run, "base_eval.json")) or {}
        groups = train["num_params_by_group"]
        budget = train.get("args", {}).get("target_flops", -1)
        rows.append({"run": run, "budget": budget if budget and budget > 0 else None, "depth": train["depth"],
                     "width": train["model_config"]["n_embd"], "params": groups["total"],
                     "scaling_params": groups["scaling"], "tokens": train["tokens"],
                     "tokens_per_param": train["tokens"] / groups["scaling"], "flops": train["total_training_flops"],
                     "val_bpb": train["val_bpb"], "core": ev.get("core"), "core_tasks": ev.get("core_tasks_used"),
                     "train_min": train["total_training_time"] / 60})
    if not rows:
        raise SystemExit(f"no <run>/base_train.json under {results_dir}: did any run of the sweep finish?")
    rows.sort(key=lambda r: (r["budget"] or 0, r["depth"], r["run"]))
    return rows


def human(n):
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def markdown(rows):
    head = ["run", "budget", "depth", "width", "params", "scaling params", "tokens", "tokens/param", "FLOPs",
            "val bpb", "CORE", "train min"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        core = "-" if r["core"] is None else f"{r['core']:.4f}"
        if r["core"] is not None and r["core_tasks"] and r["core_tasks"] != 22:
            core += f" ({r['core_tasks']} tasks)"
        cells = [r["run"], "-" if r["budget"] is None else f"{r['budget']:.3g}", str(r["depth"]), str(r["width"]),
                 human(r["params"]), human(r["scaling_params"]), human(r["tokens"]), f"{r['tokens_per_param']:.2f}",
                 f"{r['flops']:.3g}", f"{r['val_bpb']:.4f}", core, f"{r['train_min']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results_dir", help="folder with one <run>/base_train.json (+ base_eval.json) per run")
    p.add_argument("--title", default="", help="a heading written above the table in table.md")
    args = p.parse_args(argv)
    rows = collect(args.results_dir)
    table = markdown(rows)
    with open(os.path.join(args.results_dir, "table.md"), "w") as f:
        f.write((f"# {args.title}\n\n" if args.title else "") + table)
    with open(os.path.join(args.results_dir, "results.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    print(table, end="")
    print(f"wrote {os.path.join(args.results_dir, 'table.md')} and results.csv")
    return rows


if __name__ == "__main__":
    main()
