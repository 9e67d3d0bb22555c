"""`clove-dist demo`: the whole CLoVe path on a synthetic compositional world, in minutes on a CPU.

    clove-dist demo                       # writes demo-out/, prints one table
    clove-dist demo --out /tmp/demo --base-steps 100 --clove-steps 60

1. world      coloured shapes in spatial relations. Pre-training shards: web-style alt-text only ("red circle
              stock photo blue square png"), ten colours and six shapes. Fine-tuning shards in LAION-COCO's layout:
              clean captions ("a small red circle to the left of a large blue square"), six colours and four
              shapes. A SugarCrepe-format set on compositions no training image shows, and a zero-shot set over
              the pre-training classes
2. base       a small CLIP (clove-tiny-rn, a ResNet: at this size it learns shapes in a few hundred steps, a ViT
              does not) trained from scratch on the alt-text shards without negatives: it stands in for the
              pre-trained OpenAI weights, which no one can download here
3. negatives  `clove-dist negatives` on the fine-tuning shards: captions parsed once, parses and the corpus
              vocabulary written next to the shards (REPLACE then only picks words the captions use, and no
              negative pairs a colour or size with a shape no caption pairs it with: a held-out pair is never a
              negative text)
4. clove      fine-tuning from the base weights on the synthetic captions with hard negatives, REPLACE and
              NegCLIP-style swaps (the same trainer as `clove-dist train`), one pass over the fine-tuning images
              by default (--num-train = --clove-steps x --batch-size)
5. sweep      `clove-dist sweep`: w = (1 - alpha) * base + alpha * fine-tuned for alpha 0, 0.2, ..., 1, each
              evaluated on the SugarCrepe-format set and zero-shot classification; sweep.png plots one against
              the other, the curve alpha is picked from. clove-tiny-rn has BatchNorm: each patched model's
              statistics are computed again from 2,048 fine-tuning images (patching/batchnorm.py)

The training settings are configs/demo.yaml (shipped with the package; --config for another); the flags below set
the sizes. Writes results.md (the table: base, CLoVe at alpha 0.6, fine-tuned), results.json (one row per model:
model, alpha, replace, swap, add, sugarcrepe_avg, zeroshot_top1, in percent), and the sweep's sweep.csv,
sweep.json, sweep.png and eval_alpha<A>.json.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

from .errors import entry_point
from .log import log

ALPHAS = (0.0, 0.6, 1.0)  # the table's rows: base, CLoVe as the paper patches it, fine-tuned


def _stage(title: str) -> float:
    log(f"\n== {title}")
    return time.perf_counter()


def _train(config_path: Path, overrides: list[str]) -> dict[str, Any]:
    from .config import load_config
    from .train import train
    return train(load_config(config_path, overrides))


def _sweep(model: str, base_weights: str, tuned: str, alphas: list[float], out: Path, world, title: str,
           save_patched: bool = False) -> dict[float, dict[str, Any]]:
    """`clove-dist sweep` of base -> tuned on the world's sets into `out`; its rows by alpha (fractions)."""
    from .patching.sweep import sweep
    rows = sweep(model, base_weights, tuned, alphas, out, sugarcrepe=world.sugarcrepe_dir,
                 zeroshot=world.zeroshot_dir, batch_size=128, save_patched=save_patched, progress=False, title=title,
                 bn_shards=world.train_pattern)
    return {r["alpha"]: r for r in rows}


def _pct(v: Any) -> float | None:
    return None if v is None else round(100 * float(v), 2)


def _row(name: str, swept: dict[str, Any]) -> dict[str, Any]:
    """One results.json row, in percent, from a sweep row (fractions)."""
    return {"model": name, "alpha": swept["alpha"], "replace": _pct(swept["replace"]), "swap": _pct(swept["swap"]),
            "add": _pct(swept["add"]), "sugarcrepe_avg": _pct(swept["sugarcrepe"]),
            "zeroshot_top1": _pct(swept["zeroshot_top1"])}


# results.json columns after the model name, and the heads the tables give them
COLUMNS = ["replace", "swap", "add", "sugarcrepe_avg", "zeroshot_top1"]
HEADS = ["model", "SC replace", "SC swap", "SC add", "SC avg", "zero-shot top-1"]


def format_table(rows: list[dict[str, Any]]) -> str:
    cols, heads = ["model", *COLUMNS], HEADS

    def cell(v: Any) -> str:
        return f"{v:.1f}" if isinstance(v, float) else str(v)
    body = [[cell(r[c]) for c in cols] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(heads)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"  # noqa: E731
    return "\n".join([line(heads), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, body)])


def format_sweep(rows: list[dict[str, Any]]) -> str:
    """The sweep as one line per quantity, a column per alpha, in percent."""
    lines = [("alpha", [f"{r['alpha']:g}" for r in rows]),
             ("SC avg", [f"{100 * r['sugarcrepe']:.1f}" for r in rows]),
             ("zero-shot top-1", [f"{100 * r['zeroshot_top1']:.1f}" for r in rows])]
    return "\n".join(f"{head:<16}" + "".join(f"{v:>7}" for v in vals) for head, vals in lines)


def seeds_table(runs: list[list[dict[str, Any]]]) -> str:
    """Mean and spread (sample standard deviation; min-max) over seeds of each results.json column."""
    import statistics
    lines = ["| " + " | ".join(HEADS) + " |", "|" + "|".join("---" for _ in HEADS) + "|"]
    for i, row in enumerate(runs[0]):
        cells = [row["model"]]
        for c in COLUMNS:
            vals = [run[i][c] for run in runs]
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            cells.append(f"{statistics.mean(vals):.1f} +- {sd:.1f} ({min(vals):.1f}-{max(vals):.1f})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# The paper's ablations, each a fine-tuning run from the same base with one change (Table 4 of the paper).
ABLATIONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("without hard negatives", ("negatives.style=none",)),
    ("alt-text instead of synthetic captions", ("data.caption_key=txt",)),
    ("REPLACE negatives only", ("negatives.style=replace",)),
    ("swap negatives only", ("negatives.style=swap",)),
)


def _ablations(config: Path, common: list[str], model: str, world, base_weights: str, vocabulary: Path,
               rows: list[dict[str, Any]], args, out: Path) -> str:
    """Fine-tune once per ablation; the table holds each patched at 0.6 and at alpha 1, next to full CLoVe. Each
    ablation's sweep (eval_alpha<A>.json, sweep.csv/json/png) lands in out/ablation<N>/."""
    table = [{**rows[1], "model": "CLoVe (REPLACE + swaps, synthetic captions)"},
             {**rows[2], "model": "CLoVe without patching"}]
    for i, (name, overrides) in enumerate(ABLATIONS):
        t = _stage(f"ablation {i + 1}/{len(ABLATIONS)}: {name}")
        run = _train(config, common + [
            f"run.name=ablation{i + 1}", f"data.train_shards={world.train_pattern}",
            f"model.pretrained={base_weights}", f"negatives.vocabulary={vocabulary}",
            f"train.total_samples={args.clove_steps * args.batch_size}", *overrides])
        tuned = str(Path(run["run_dir"]) / "export" / "finetuned.safetensors")
        swept = _sweep(model, base_weights, tuned, [0.6, 1.0], out / f"ablation{i + 1}", world,
                       title=f"{model} on the synthetic world, ablation: {name}")
        table += [_row(f"{name} (alpha {a:g})", swept[a]) for a in (0.6, 1.0)]
        log(f"   ({time.perf_counter() - t:.0f} s)")
    (out / "ablations.json").write_text(json.dumps(table, indent=2) + "\n")
    return format_table(table)


@entry_point
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="clove-dist demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="demo-out", help="output directory (default: ./demo-out)")
    ap.add_argument("--config", default="", help="training settings (default: the packaged configs/demo.yaml)")
    ap.add_argument("--num-pretrain", type=int, default=10000, help="pre-training (alt-text) images")
    ap.add_argument("--num-train", type=int, default=0,
                    help="fine-tuning (synthetic caption) images (default: clove-steps x batch-size, one pass)")
    ap.add_argument("--num-eval", type=int, default=500, help="SugarCrepe-format examples per subset")
    ap.add_argument("--num-zeroshot-per-class", type=int, default=10, help="zero-shot images per class")
    ap.add_argument("--base-steps", type=int, default=400, help="steps of base (pre-)training, no negatives")
    ap.add_argument("--clove-steps", type=int, default=600, help="steps of CLoVe fine-tuning with negatives")
    ap.add_argument("--batch-size", type=int, default=64, help="batch size of both trainings")
    ap.add_argument("--workers", type=int, default=1, help="data loader workers per training")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sweep-alphas", nargs="+", default=["0:1:0.2"],
                    help="alphas of the sweep, start:stop:step and/or numbers (0, 0.6 and 1 are always in)")
    ap.add_argument("--ablations", action="store_true",
                    help="also fine-tune without hard negatives, on alt-text, with REPLACE only and with swaps "
                         "only; writes ablations.md")
    args = ap.parse_args(argv)
    args.num_train = args.num_train or args.clove_steps * args.batch_size
    from .patching.sweep import parse_alphas
    alphas = sorted(set(parse_alphas(args.sweep_alphas)) | set(ALPHAS))  # a bad alpha fails now, not after training

    from .config import load_config, packaged_config
    from .data.synthetic import write_world
    from .model import model_config
    from .negatives import precompute

    t_all = time.perf_counter()
    out = Path(args.out).resolve()
    shutil.rmtree(out / "runs", ignore_errors=True)  # a demo starts afresh: never resume an earlier demo's runs
    config = Path(args.config) if args.config else packaged_config("demo")
    common = [f"run.output_dir={out / 'runs'}", f"data.batch_size={args.batch_size}",
              f"data.num_workers={args.workers}", f"run.seed={args.seed}", "patching.alphas=[]"]
    model = load_config(config, common).model.name  # a bad config fails now, not after the world is written
    image_size = model_config(model)["vision_cfg"]["image_size"]  # the world is drawn at the model's resolution

    t = _stage("1/5 world: alt-text and synthetic-caption shards, SugarCrepe-format and zero-shot sets")
    world = write_world(out / "world", seed=args.seed, num_train=args.num_train, num_pretrain=args.num_pretrain,
                        samples_per_shard=max(1, args.num_train // 4), num_eval_per_subset=args.num_eval,
                        num_zeroshot_per_class=args.num_zeroshot_per_class, image_size=image_size,
                        num_retrieval_images=16, num_aro_per_subset=8, progress=False)
    log(f"   {world.num_pretrain} pre-training and {world.num_train} fine-tuning images "
        f"({time.perf_counter() - t:.0f} s)")

    t = _stage(f"2/5 base: {model} from scratch on alt-text, {args.base_steps} steps without negatives")
    base = _train(config, common + [
        "run.name=base", f"data.train_shards={world.pretrain_pattern}", "negatives.style=none",
        "data.caption_key=txt",
        f"train.total_samples={args.base_steps * args.batch_size}", "optim.lr=1e-3", "optim.warmup_steps=20"])
    base_weights = str(Path(base["run_dir"]) / "export" / "finetuned.safetensors")
    log(f"   loss {base['loss']:.3f} ({time.perf_counter() - t:.0f} s)")

    t = _stage("3/5 negatives: parse every caption once, sidecar next to each shard")
    # two parsing processes: the stage has the machine to itself (44 s -> 29 s for 38,400 captions, same sidecars)
    rc = precompute.main(["--shards", world.train_pattern, "--workers", str(max(2, args.workers))])
    if rc != 0:
        return rc
    log(f"   ({time.perf_counter() - t:.0f} s)")

    t = _stage(f"4/5 clove: fine-tune from base with hard negatives, {args.clove_steps} steps")
    vocabulary = Path(world.train_pattern).parent / "negatives.vocab.json"  # written by `clove-dist negatives`
    clove = _train(config, common + [
        "run.name=clove", f"data.train_shards={world.train_pattern}", f"model.pretrained={base_weights}",
        f"negatives.vocabulary={vocabulary}",
        f"train.total_samples={args.clove_steps * args.batch_size}"])
    clove_weights = str(Path(clove["run_dir"]) / "export" / "finetuned.safetensors")
    log(f"   loss {clove['loss']:.3f} ({time.perf_counter() - t:.0f} s)")

    t = _stage("5/5 sweep: patch at every alpha, evaluate each on the SugarCrepe-format and zero-shot sets")
    swept = _sweep(model, base_weights, clove_weights, alphas, out, world, save_patched=True,
                   title=f"{model} on the synthetic world: base (alpha 0) to CLoVe fine-tuned (alpha 1)")
    names = {0.0: "base (alpha 0)", 1.0: "fine-tuned (alpha 1)"}
    rows = [_row(names.get(a, f"CLoVe (alpha {a})"), swept[a]) for a in ALPHAS]
    log(f"   ({time.perf_counter() - t:.0f} s)")

    table = format_table(rows)
    (out / "results.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(table)
    print("\n" + format_sweep(list(swept.values())))
    print(f"alpha sweep, SugarCrepe average against zero-shot top-1: {out / 'sweep.png'}")
    if args.ablations:
        ablations = _ablations(config, common, model, world, base_weights, vocabulary, rows, args, out)
        (out / "ablations.md").write_text(ablations + "\n")
        print("\n" + ablations)
    log(f"\ndemo finished in {time.perf_counter() - t_all:.0f} s; outputs in {out}:")
    log("  world/  runs/base, runs/clove (metrics.jsonl, checkpoints, exports)  patched_alpha*.safetensors  "
        "eval_alpha*.json  sweep.csv  sweep.json  sweep.png  results.md  results.json")
    return 0
