"""Build the version-blind pool of negatives for the judged set (benchmarks/data/README.md tells the procedure).

    # 1. negatives of both generators, each run from its own checkout:
    PYTHONPATH=/tmp/neg-old python benchmarks/data/make_pool.py gen --out /tmp/old.json
    PYTHONPATH=.            python benchmarks/data/make_pool.py gen --out /tmp/new.json
    # 2. pool them, shuffled, without version labels (the labels go to a separate file, read only after judging):
    python benchmarks/data/make_pool.py pool /tmp/old.json /tmp/new.json
    # 3. judge negatives_pool.jsonl (texts no earlier round judged) by hand into negatives_judgments.jsonl, then:
    python benchmarks/data/make_pool.py join

Settings: style both, 2 negatives per caption, seed 0, key = "<split>-<line number>", epochs 0 and 1.
Rounds: round 1 judged the first version of the new generator (epoch 0), round 2 the tuned one (epoch 0, with the
captions of heldout2 added), round 3 the final one (epochs 0 and 1). A text judged in an earlier round keeps its
verdict (every round was judged blind); each round's pool holds only texts never judged, of both generators.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
EPOCHS = (0, 1)
SPLITS = {"tuning": HERE / "captions_tuning.txt", "heldout": HERE / "captions_heldout.txt",
          "heldout2": HERE / "captions_heldout2.txt"}


def captions() -> list[tuple[str, str, str]]:
    """(split, key, caption) of every caption of the set."""
    out = []
    for split, path in SPLITS.items():
        for i, line in enumerate(path.read_text().splitlines()):
            if line.strip():
                out.append((split, f"{split}-{i:03d}", line.strip()))
    return out


def gen(out: str) -> None:
    from clove_dist.config import NegativesConfig
    from clove_dist.negatives import build
    g = build(NegativesConfig(style="both", max_per_caption=2, seed=0))
    rows = captions()
    found = []
    for epoch in EPOCHS:
        result = g.generate_many([c for _, _, c in rows], [k for _, k, _ in rows], epoch=epoch)
        found += [{"split": s, "key": k, "caption": c, "epoch": epoch,
                   "negatives": [{"text": n.text, "kind": n.kind} for n in negs]}
                  for (s, k, c), negs in zip(rows, result)]
    Path(out).write_text(json.dumps(found, indent=0))


def _earlier_judgments() -> dict[tuple[str, str], dict]:
    """(caption, negative) -> judgment of an earlier round, judged blind too: a text judged once keeps its verdict,
    and only texts never seen go into the new pool."""
    found = {}
    for number in (1, 2):
        path = HERE / f"round{number}_negatives_judged.jsonl"
        if path.is_file():
            for r in map(json.loads, open(path)):
                found.setdefault((r["caption"], r["negative"]),
                                 {"valid": r["valid"], "reason": r["reason"],
                                  "round": r.get("judged_in_round", number)})
    return found


def pool(old: str, new: str) -> None:
    entries: dict[tuple[str, str], dict] = {}
    for version, path in (("old", old), ("new", new)):
        for row in json.loads(Path(path).read_text()):
            for neg in row["negatives"]:
                e = entries.setdefault((row["key"], neg["text"]), {"split": row["split"], "key": row["key"],
                                                                   "caption": row["caption"],
                                                                   "negative": neg["text"], "by": {}})
                e["by"][version] = neg["kind"]
    items = list(entries.values())
    random.Random(20261203).shuffle(items)
    earlier = _earlier_judgments()
    num_new = 0
    with open(HERE / "negatives_pool.jsonl", "w") as f:  # what the judge reads: no version, no kind
        for i, e in enumerate(items):
            if (e["caption"], e["negative"]) not in earlier:
                f.write(json.dumps({"id": i, "caption": e["caption"], "negative": e["negative"]}) + "\n")
                num_new += 1
    with open(HERE / "negatives_pool_labels.jsonl", "w") as f:
        for i, e in enumerate(items):
            f.write(json.dumps({"id": i, "split": e["split"], "key": e["key"], "caption": e["caption"],
                                "negative": e["negative"], "by": e["by"]}) + "\n")
    print(f"{len(items)} pooled negatives, {num_new} not judged before")


def join() -> None:
    labels = {r["id"]: r for r in map(json.loads, open(HERE / "negatives_pool_labels.jsonl"))}
    judged = {r["id"]: {**r, "round": 3} for r in map(json.loads, open(HERE / "negatives_judgments.jsonl"))}
    earlier = _earlier_judgments()
    for i, r in labels.items():
        if i not in judged and (r["caption"], r["negative"]) in earlier:
            judged[i] = earlier[(r["caption"], r["negative"])]
    missing = sorted(set(labels) - set(judged))
    if missing:
        sys.exit(f"not judged: {missing[:10]}...")
    with open(HERE / "negatives_judged.jsonl", "w") as f:
        for i in sorted(labels):
            for version, kind in sorted(labels[i]["by"].items()):
                f.write(json.dumps({"caption": labels[i]["caption"], "negative": labels[i]["negative"],
                                    "version": version, "kind": kind, "split": labels[i]["split"],
                                    "key": labels[i]["key"], "valid": judged[i]["valid"],
                                    "reason": judged[i]["reason"], "judged_in_round": judged[i]["round"]}) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("gen")
    g.add_argument("--out", required=True)
    p = sub.add_parser("pool")
    p.add_argument("old")
    p.add_argument("new")
    sub.add_parser("join")
    args = ap.parse_args(argv)
    if args.cmd == "gen":
        gen(args.out)
    elif args.cmd == "pool":
        pool(args.old, args.new)
    else:
        join()
    return 0


if __name__ == "__main__":
    sys.exit(main())
