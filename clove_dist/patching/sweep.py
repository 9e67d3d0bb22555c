"""Alpha sweep: evaluate every patched model between pre-trained and fine-tuned, the curve a user picks alpha from.

    clove-dist sweep --model ViT-B-32-quickgelu --pretrained base.safetensors --finetuned runs/clove/checkpoints \\
        --alphas 0:1:0.1 --sugarcrepe data/sugarcrepe --zeroshot data/imagenet --out sweep/

writes sweep/sweep.csv and sweep/sweep.json (one row per alpha: SugarCrepe average and groups, zero-shot top-1),
sweep/eval_alpha<A>.json (every number the evaluation gave for that alpha, per subset) and sweep/sweep.png:
SugarCrepe average (compositionality) against zero-shot top-1, one labelled point per alpha, joined in alpha order.
CLoVe's paper picks alpha 0.6 from this curve.

Each patched model is written into one model in memory, tensor by tensor, from the memory-mapped inputs (no second
or third copy of the weights); nothing goes to disk unless --save-patched. Inputs are as for `clove-dist patch`:
weights files, DeepSpeed checkpoint directories, zero_to_fp32 output.

A model with BatchNorm (ResNet CLIPs) needs --bn-shards: each patched model strictly between alpha 0 and 1 then
has its BatchNorm statistics computed again from the first --bn-images images of those shards (batchnorm.py); the
two ends are the inputs as they are.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from ..errors import entry_point
from .batchnorm import recompute_batchnorm, statistics_images, wants_statistics
from .stream import (PatchError, check_alpha, check_compatible, interpolate_tensor, open_weights, patched_name,
                     save_state)

PLOT_SIZE = (7.0, 5.0)  # inches, at PLOT_DPI: a 700 x 500 pixel image
PLOT_DPI = 100
COLUMNS = ["alpha", "sugarcrepe", "replace", "swap", "add", "zeroshot_top1", "zeroshot_top5", "seconds"]


def parse_alphas(values: list[str], allow_extrapolation: bool = False) -> list[float]:
    """`0:1:0.1` (start:stop:step, stop included) and/or plain numbers, in the order given, duplicates dropped."""
    out: list[float] = []
    for v in values:
        if ":" in v:
            try:
                start, stop, step = (float(x) for x in v.split(":"))
            except ValueError:
                raise PatchError(f"--alphas: {v!r} is not start:stop:step") from None
            if not step > 0 or stop < start:
                raise PatchError(f"--alphas: {v!r} needs step > 0 and stop >= start")
            count = math.floor((stop - start) / step + 1e-9) + 1
            out += [round(start + i * step, 10) for i in range(count)]  # 0.30000000000000004 -> 0.3
        else:
            try:
                out.append(float(v))
            except ValueError:
                raise PatchError(f"--alphas: {v!r} is not a number") from None
    alphas = list(dict.fromkeys(check_alpha(a, allow_extrapolation) for a in out))
    if not alphas:
        raise PatchError("--alphas: no alpha given")
    return alphas


def load_patched(model: torch.nn.Module, pre, fine, alpha: float) -> None:
    """Write (1 - alpha) * pre + alpha * fine into `model`, one tensor at a time."""
    with torch.no_grad():
        for k, t in model.state_dict().items():
            t.copy_(interpolate_tensor(pre[k], fine[k], alpha).reshape(t.shape))


def _row(alpha: float, res: dict[str, Any], seconds: float) -> dict[str, Any]:
    sc, zs = res.get("sugarcrepe", {}), res.get("zeroshot", {})
    return {"alpha": alpha, "sugarcrepe": sc.get("average"), "replace": sc.get("replace"), "swap": sc.get("swap"),
            "add": sc.get("add"), "zeroshot_top1": zs.get("top1"), "zeroshot_top5": zs.get("top5"),
            "seconds": round(seconds, 2)}


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> Path:
    """SugarCrepe average against zero-shot top-1, a labelled point per alpha."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    pts = [r for r in rows if r["sugarcrepe"] is not None and r["zeroshot_top1"] is not None]
    fig, ax = plt.subplots(figsize=PLOT_SIZE, dpi=PLOT_DPI)
    xs = [100 * r["zeroshot_top1"] for r in pts]
    ys = [100 * r["sugarcrepe"] for r in pts]
    ax.plot(xs, ys, "-", color="0.6", zorder=1)
    sc = ax.scatter(xs, ys, c=[r["alpha"] for r in pts], cmap="viridis", zorder=2)
    labels: dict[tuple[float, float], list[str]] = {}  # alphas that land on the same point share one label
    for x, y, r in zip(xs, ys, pts):
        labels.setdefault((round(x, 6), round(y, 6)), []).append(f"{r['alpha']:g}")
    for (x, y), alphas in labels.items():
        ax.annotate("α=" + ", ".join(alphas), (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    fig.colorbar(sc, ax=ax, label="alpha (weight of the fine-tuned model)")
    ax.set_xlabel("zero-shot top-1 (%)")
    ax.set_ylabel("SugarCrepe average (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=PLOT_DPI)  # fixed size, no bbox trimming: the picture is always PLOT_SIZE * PLOT_DPI
    plt.close(fig)
    return path


def _write_tables(rows: list[dict[str, Any]], out: Path, meta: dict[str, Any]) -> None:
    with (out / "sweep.csv.partial").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    (out / "sweep.csv.partial").replace(out / "sweep.csv")
    (out / "sweep.json.partial").write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")
    (out / "sweep.json.partial").replace(out / "sweep.json")


def _eval_name(alpha: float) -> str:
    """File name of the evaluation of the weights patched at `alpha` (written beside patched_name(alpha))."""
    return f"eval_alpha{alpha:g}.json"


def _earlier_alphas(out: Path) -> list[float]:
    """The alphas of the sweep already in `out` (its sweep.json), [] if there is none or it cannot be read."""
    try:
        return [float(r["alpha"]) for r in json.loads((out / "sweep.json").read_text())["rows"]]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def sweep(model_name: str, pretrained: str, finetuned: str, alphas: list[float], out: Path, *,
          sugarcrepe: str = "", sugarcrepe_images: str = "", zeroshot: str = "", device: str = "cpu",
          batch_size: int = 64, save_patched: bool = False, progress: bool = True,
          title: str = "", bn_shards: str = "", bn_images: int = 2048) -> list[dict[str, Any]]:
    """Evaluate every alpha; writes sweep.csv, sweep.json, eval_alpha<A>.json (after each alpha) and sweep.png
    (titled `title`, default: the model and the two inputs) into `out`. With `bn_shards`, every patched model
    strictly between 0 and 1 has its BatchNorm statistics computed again from `bn_images` of their images.
    Replacing an earlier sweep there, its eval_alpha<A>.json and patched_alpha<A>.safetensors of alphas not in
    this one are removed."""
    from ..config import ModelConfig
    from ..dist import pick_device
    from ..eval import evaluate_all
    from ..log import log
    from ..model import create
    pre, fine = open_weights(pretrained), open_weights(finetuned)
    check_compatible(pre, fine, shape_of=lambda src, k: src.shape_dtype(k)[0])
    dev = pick_device(device, local_rank=0)
    model, _, preprocess, tokenizer = create(ModelConfig(name=model_name), dev)
    expected = set(model.state_dict())
    if expected != set(pre):
        missing = sorted(expected - set(pre)) or sorted(set(pre) - expected)
        raise PatchError(f"the weights are not of {model_name}: {len(missing)} tensors differ (first: {missing[0]})")
    bn_pixels = (statistics_images(bn_shards, preprocess, bn_images, log)
                 if wants_statistics(expected, bn_shards, alphas, model_name, log) else None)
    out.mkdir(parents=True, exist_ok=True)
    earlier = _earlier_alphas(out)
    meta = {"model": model_name, "pretrained": str(pretrained), "finetuned": str(finetuned),
            "sugarcrepe": sugarcrepe, "zeroshot": zeroshot,
            "bn_images": len(bn_pixels) if bn_pixels is not None else 0, "bn_shards": bn_shards}
    rows = []
    for alpha in alphas:
        t = time.perf_counter()
        load_patched(model, pre, fine, alpha)
        if bn_pixels is not None and 0 < alpha < 1:
            recompute_batchnorm(model, bn_pixels, batch_size)  # moved to the device a batch at a time
        if save_patched:
            save_state({k: v.detach().cpu() for k, v in model.state_dict().items()}, out / patched_name(alpha))
        res = evaluate_all(model, preprocess, tokenizer, sugarcrepe_dir=sugarcrepe,
                           sugarcrepe_image_dir=sugarcrepe_images, zeroshot_dir=zeroshot, device=dev,
                           batch_size=batch_size, progress=False)
        (out / _eval_name(alpha)).write_text(json.dumps(res, indent=2) + "\n")
        rows.append(_row(alpha, res, time.perf_counter() - t))
        r = rows[-1]
        log(f"alpha {alpha:g}: SugarCrepe average {r['sugarcrepe']}, zero-shot top-1 {r['zeroshot_top1']} "
            f"({r['seconds']:.1f} s)")
        _write_tables(rows, out, meta)
    for alpha in set(earlier) - set(alphas):  # an earlier sweep's files for alphas this one left out would mislead
        (out / _eval_name(alpha)).unlink(missing_ok=True)
        (out / patched_name(alpha)).unlink(missing_ok=True)
    if sugarcrepe and zeroshot:
        plot(rows, out / "sweep.png",
             title or f"{model_name}: patching {Path(pretrained).name} -> {Path(finetuned).name}")
    return rows


@entry_point
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="clove-dist sweep", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="open_clip architecture of both inputs")
    ap.add_argument("--pretrained", required=True, help="pre-trained weights")
    ap.add_argument("--finetuned", required=True, help="fine-tuned weights, or a DeepSpeed checkpoint directory")
    ap.add_argument("--alphas", nargs="+", default=["0:1:0.1"], help="start:stop:step and/or numbers")
    ap.add_argument("--sugarcrepe", default="", help="SugarCrepe-format directory")
    ap.add_argument("--sugarcrepe-images", default="", help="its image folder (default: <sugarcrepe>/images)")
    ap.add_argument("--zeroshot", default="", help="CLIP_benchmark-format classification directory")
    ap.add_argument("--out", required=True, help="output directory (sweep.csv, sweep.json, sweep.png)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--save-patched", action="store_true", help="also write patched_alpha<A>.safetensors")
    ap.add_argument("--allow-extrapolation", action="store_true", help="accept alphas outside [0, 1]")
    ap.add_argument("--overwrite", action="store_true", help="replace an earlier sweep in --out")
    ap.add_argument("--bn-shards", default="",
                    help="webdataset shards whose images give each patched model's BatchNorm statistics "
                         "(models with BatchNorm, e.g. ResNet CLIPs)")
    ap.add_argument("--bn-images", type=int, default=2048, help="images read from --bn-shards (default 2048)")
    args = ap.parse_args(argv)
    if not (args.sugarcrepe and args.zeroshot):
        raise PatchError("sweep: give both --sugarcrepe DIR and --zeroshot DIR (the plot needs both axes)")
    alphas = parse_alphas(args.alphas, args.allow_extrapolation)
    out = Path(args.out)
    if out.is_file():
        raise PatchError(f"--out {out} is a file; give a directory")
    clash = [p for p in ("sweep.csv", "sweep.json", "sweep.png") if (out / p).exists()]
    if clash and not args.overwrite:
        raise PatchError(f"{out / clash[0]} exists; pass --overwrite to replace the earlier sweep")
    try:
        sweep(args.model, args.pretrained, args.finetuned, alphas, out, sugarcrepe=args.sugarcrepe,
              sugarcrepe_images=args.sugarcrepe_images, zeroshot=args.zeroshot, device=args.device,
              batch_size=args.batch_size, save_patched=args.save_patched, bn_shards=args.bn_shards,
              bn_images=args.bn_images)
    except (ValueError, FileNotFoundError) as e:
        if isinstance(e, PatchError):
            raise
        raise PatchError(f"sweep: {e}") from None
    print(out / "sweep.png")
    return 0
