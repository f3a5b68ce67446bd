"""Compression of our tokenizer vs GPT-2 (r50k_base) and GPT-4 (cl100k_base): bytes per token on built-in
samples, on local pretraining text when NANOCHAT_LOCAL_DATA is set, and on the first row group of the train
and val shards when they exist. Prints a table, writes report/tok_eval.json. The stock .tiktoken files come
from $NANOCHAT_LOCAL_DATA/tokenizers/ or are downloaded once into <base dir>/tiktoken/ (sha256-checked).

    python -m scripts.tok_eval
"""

import os
import argparse

from nanochat import dataset
from nanochat.common import (UserError, get_base_dir, get_local_data_dir, print0, write_report_json, run_cli,
                             download_file, DownloadError)
from nanochat.tokenizer import Tokenizer, STOCK_ENCODINGS, get_tokenizer

BASELINES = [("gpt2", "r50k_base"), ("gpt4", "cl100k_base")]

# Short built-in samples (written for this project) covering different kinds of text.
SAMPLES = {
    "news": ("HARBOR CITY, March 4 — The city council voted 7-2 on Tuesday night to approve a $48 million plan "
        "to rebuild the aging seawall along the eastern waterfront, ending months of debate over who should "
        "pay for the project. Supporters said the work, expected to begin next spring, would protect roughly "
        "1,200 homes and several small businesses from storm surges that have grown more frequent since 2015. "
        "\"We can't keep patching this wall with sandbags,\" said councilmember Ana Ruiz, who sponsored the "
        "measure. Opponents argued that the cost estimate relied on outdated figures and warned of delays. "
        "The mayor is expected to sign the measure by Friday."),
    "korean": ("오늘 아침에는 비가 조금 내렸지만 오후가 되자 하늘이 맑게 개었다. 우리는 도서관에 가서 새로 들어온 "
        "과학 잡지를 읽고, 근처 공원을 천천히 산책했다. 저녁에는 친구들과 함께 김치찌개를 끓여 먹으면서 "
        "다음 주에 떠날 여행 계획을 세웠다. 기차표는 이미 예매했고, 숙소는 바닷가 근처의 작은 민박으로 정했다."),
    "code": ("import heapq\n\n\n"
        "def dijkstra(graph: dict[str, list[tuple[str, float]]], source: str) -> dict[str, float]:\n"
        "    \"\"\"Shortest distances from source in a graph with non-negative edge weights.\"\"\"\n"
        "    dist = {source: 0.0}\n"
        "    queue = [(0.0, source)]\n"
        "    while queue:\n"
        "        d, node = heapq.heappop(queue)\n"
        "        if d > dist.get(node, float(\"inf\")):\n"
        "            continue  # stale queue entry\n"
        "        for neighbor, weight in graph.get(node, []):\n"
        "            nd = d + weight\n"
        "            if nd < dist.get(neighbor, float(\"inf\")):\n"
        "                dist[neighbor] = nd\n"
        "                heapq.heappush(queue, (nd, neighbor))\n"
        "    return dist\n"),
    "math": ("\\begin{theorem}\nLet $f:[a,b]\\to\\mathbb{R}$ be continuous on $[a,b]$ and differentiable on $(a,b)$. "
        "Then there exists $c\\in(a,b)$ such that\n\\begin{equation}\n  f'(c) = \\frac{f(b)-f(a)}{b-a}.\n"
        "\\end{equation}\n\\end{theorem}\n\\begin{proof}\nDefine $g(x) = f(x) - \\frac{f(b)-f(a)}{b-a}(x-a)$. "
        "Then $g(a)=g(b)=f(a)$, so by Rolle's theorem there is $c\\in(a,b)$ with $g'(c)=0$, which is the claim. "
        "\\qed\n\\end{proof}\nFor example, $\\sum_{k=1}^{n} k^2 = \\frac{n(n+1)(2n+1)}{6}$.\n"),
    "science": ("Photosynthesis converts light energy into chemical energy stored in glucose. In the light-dependent "
        "reactions, which take place in the thylakoid membranes of the chloroplast, photons excite electrons in "
        "chlorophyll a (absorption peaks near 430 nm and 662 nm). The resulting electron transport chain pumps "
        "protons across the membrane, and ATP synthase uses this gradient to produce ATP, while NADP+ is reduced "
        "to NADPH. In the Calvin cycle, the enzyme RuBisCO fixes CO2 onto ribulose-1,5-bisphosphate; overall, "
        "6 CO2 + 6 H2O + light -> C6H12O6 + 6 O2.")}


def stock_tiktoken_path(name):
    """Local copy of a stock .tiktoken file: from NANOCHAT_LOCAL_DATA, else downloaded."""
    spec = STOCK_ENCODINGS[name]
    local = get_local_data_dir()
    if local:
        path = os.path.join(local, "tokenizers", f"{name}.tiktoken")
        if not os.path.isfile(path):
            raise UserError(f"{path} is missing: NANOCHAT_LOCAL_DATA={local} should hold tokenizers/{name}.tiktoken "
                            f"(from {spec['url']}), or unset NANOCHAT_LOCAL_DATA to download it")
        return path
    path = os.path.join(get_base_dir(), "tiktoken", f"{name}.tiktoken")
    try:
        return download_file(spec["url"], path, sha256=spec["sha256"])
    except DownloadError as e:
        raise UserError(f"could not download the {name} vocabulary ({e}).\nOffline? Set NANOCHAT_LOCAL_DATA to a "
                        f"folder holding tokenizers/{name}.tiktoken, or place the file at {path}")


def local_pretrain_samples(max_chars):
    """A few real texts from $NANOCHAT_LOCAL_DATA/pretrain_text (a book, web text, encyclopedia)."""
    local, out = get_local_data_dir(), {}
    for label, rel in [("gutenberg", "nltk_gutenberg/melville-moby_dick.txt"),
                       ("wiki", "llamafactory_demo/wiki_demo.txt"), ("c4", "llamafactory_demo/c4_demo.jsonl")]:
        path = os.path.join(local or "", "pretrain_text", rel)
        if local and os.path.isfile(path):
            joined = ""
            for k, text in enumerate(dataset.file_texts(path)):  # the whole .txt, or the .jsonl's texts
                joined += ("\n\n" if k else "") + text
                if len(joined) >= max_chars:
                    break
            out[label] = joined[:max_chars]
    return out


def shard_samples(max_chars):
    """The first row group of the train and val splits, when shards exist."""
    out = {}
    for split in ("train", "val"):
        try:
            out[f"shard-{split}"] = "\n".join(next(iter(dataset.parquets_iter_batched(split))))[:max_chars]
        except (dataset.DataError, StopIteration) as e:
            print0(f"(skipping the {split} shard sample: {e})")
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description="Compare our tokenizer's compression (bytes/token) with GPT-2 and GPT-4.")
    parser.add_argument("--max-chars", type=int, default=2_000_000,
                        help="cap each local/shard sample at this many characters (default: 2,000,000)")
    args = parser.parse_args(argv)

    ours = get_tokenizer()
    baselines = {label: Tokenizer.from_tiktoken_file(stock_tiktoken_path(name), name) for label, name in BASELINES}

    texts = [(label, source, text) for source, samples in [
        ("built-in", SAMPLES), ("NANOCHAT_LOCAL_DATA/pretrain_text", local_pretrain_samples(args.max_chars)),
        ("first row group of the shards", shard_samples(args.max_chars))] for label, text in samples.items()]
    rows = []
    for label, source, text in texts:
        nbytes = len(text.encode("utf-8"))
        row = {"text": label, "source": source, "bytes": nbytes}
        for name, tok in [("ours", ours)] + list(baselines.items()):
            n = len(tok.encode(text))
            row[f"{name}_tokens"] = n
            row[f"{name}_bytes_per_token"] = round(nbytes / max(n, 1), 4)
        for name in baselines:  # positive = we need fewer tokens than the baseline for the same text
            theirs = row[f"{name}_tokens"]
            row[f"diff_vs_{name}_pct"] = round(100.0 * (theirs - row["ours_tokens"]) / max(theirs, 1), 2)
        rows.append(row)

    header = (f"{'text':<12} {'bytes':>9} {'ours':>9} {'B/tok':>6} {'gpt2':>9} {'B/tok':>6} {'gpt4':>9} {'B/tok':>6} "
              f"{'vs gpt2':>8} {'vs gpt4':>8}")
    print0(f"our tokenizer: vocab {ours.get_vocab_size():,}, fingerprint {ours.fingerprint[:16]}...")
    print0("relative diff = (baseline tokens - our tokens) / baseline tokens; positive = we compress better")
    print0(f"{header}\n{'-' * len(header)}")
    for r in rows:
        print0(f"{r['text']:<12} {r['bytes']:>9,} {r['ours_tokens']:>9,} {r['ours_bytes_per_token']:>6.2f} "
               f"{r['gpt2_tokens']:>9,} {r['gpt2_bytes_per_token']:>6.2f} {r['gpt4_tokens']:>9,} "
               f"{r['gpt4_bytes_per_token']:>6.2f} {r['diff_vs_gpt2_pct']:>+7.1f}% {r['diff_vs_gpt4_pct']:>+7.1f}%")

    report = {"args": vars(args), "vocab_size": ours.get_vocab_size(), "fingerprint": ours.fingerprint,
              "baselines": dict(BASELINES), "rows": rows}
    print0(f"wrote {write_report_json('tok_eval', report)}")
    return report


if __name__ == "__main__":
    run_cli(main)
