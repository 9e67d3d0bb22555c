"""The `clove-dist` command.

    clove-dist demo                                   # the whole CLoVe path on a synthetic world, one table
    clove-dist world --out data/world                 # the synthetic world: shards and every evaluation set
    clove-dist train --config configs/debug.yaml [--set optim.lr=1e-5 ...]
    clove-dist negatives --shards 'data/world/train/{00000..00003}.tar' --workers 2
    clove-dist patch --pretrained A --finetuned B|RUN/checkpoints --alpha 0.6 --out C.safetensors
    clove-dist export RUN/checkpoints --out F.safetensors   # any ZeRO stage / world size, one tensor at a time
    torchrun --nproc_per_node N -m clove_dist.cli patch --checkpoint RUN --alpha 0.6   # sharded, on the ranks
    clove-dist sweep --model M --pretrained A --finetuned B --alphas 0:1:0.1 --sugarcrepe DIR --zeroshot DIR --out D
    clove-dist eval --model clove-tiny --pretrained C.safetensors --sugarcrepe DIR --zeroshot DIR \\
        --retrieval DIR --aro DIR [--no-strict] [--out r.json]
    clove-dist bench loss|negatives|patching|compile|startup|demo_probe [args]  # benchmarks of a source checkout

Each subcommand is a `main(argv) -> int` of its own module; this file only dispatches.
"""
from __future__ import annotations

import argparse
import json
import runpy
import sys
from pathlib import Path

from .errors import UserError, entry_point

COMMANDS = {
    "demo": ("clove_dist.demo", "run the whole CLoVe path on a synthetic world and print one table"),
    "world": ("clove_dist.data.synthetic", "write the synthetic compositional world"),
    "train": ("clove_dist.train", "train (single process, torchrun or srun)"),
    "negatives": ("clove_dist.negatives.precompute", "parse captions once and write negatives sidecars"),
    "patch": ("clove_dist.patching.commands:patch_main", "interpolate pre-trained and fine-tuned weights"),
    "export": ("clove_dist.patching.commands:export_main", "write a DeepSpeed checkpoint's weights as safetensors"),
    "sweep": ("clove_dist.patching.sweep:main", "evaluate many alphas; plot compositionality vs zero-shot"),
    "eval": ("clove_dist.cli", "evaluate a model on SugarCrepe, ARO, zero-shot and retrieval sets"),
    "bench": ("clove_dist.cli", "run a benchmark script of a source checkout"),
}


@entry_point
def eval_main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="clove-dist eval", description="Evaluate an open_clip model.")
    ap.add_argument("--model", required=True, help="open_clip architecture (e.g. ViT-B-32, clove-tiny)")
    ap.add_argument("--pretrained", default="", help="open_clip tag or local weights file")
    ap.add_argument("--sugarcrepe", default="", help="SugarCrepe-format directory")
    ap.add_argument("--sugarcrepe-images", default="", help="image folder (default: <sugarcrepe>/images)")
    ap.add_argument("--zeroshot", default="", help="CLIP_benchmark-format classification directory")
    ap.add_argument("--retrieval", default="", help="CLIP_benchmark-format retrieval directory (dataset_type.txt)")
    ap.add_argument("--aro", default="", help="ARO directory (visual_genome_*.json + images/, *_test.json)")
    ap.add_argument("--aro-coco-root", default="", help="COCO-Order image root (default: <aro>)")
    ap.add_argument("--aro-flickr-root", default="", help="Flickr30k-Order image root (default: <aro>)")
    ap.add_argument("--strict", action=argparse.BooleanOptionalAction, default=True,
                    help="fail when more than --max-missing-share of a set's images is missing (default: on)")
    ap.add_argument("--max-missing-share", type=float, default=0.0, help="allowed share of missing images")
    ap.add_argument("--seed", type=int, default=0, help="seed of the ARO order perturbations")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--out", default="", help="write the results here as JSON")
    args = ap.parse_args(argv)
    if not (args.sugarcrepe or args.zeroshot or args.retrieval or args.aro):
        raise UserError("eval: give at least one of --sugarcrepe, --zeroshot, --retrieval, --aro DIR")
    if not 0.0 <= args.max_missing_share <= 1.0:
        raise UserError(f"eval: --max-missing-share {args.max_missing_share!r} must be in [0, 1]")
    from . import model as cmodel
    from .config import ModelConfig
    from .dist import pick_device
    from .eval import evaluate_all
    device = pick_device(args.device, local_rank=0)
    clip, _, preprocess, tokenizer = cmodel.create(ModelConfig(name=args.model, pretrained=args.pretrained), device)
    try:
        results = evaluate_all(clip, preprocess, tokenizer, sugarcrepe_dir=args.sugarcrepe,
                               sugarcrepe_image_dir=args.sugarcrepe_images, zeroshot_dir=args.zeroshot,
                               retrieval_dir=args.retrieval, aro_dir=args.aro, aro_coco_root=args.aro_coco_root,
                               aro_flickr_root=args.aro_flickr_root, device=device, batch_size=args.batch_size,
                               progress=True, strict=args.strict, max_missing_share=args.max_missing_share,
                               seed=args.seed)
    except (ValueError, FileNotFoundError) as e:
        raise UserError(f"eval: {e}") from None
    results["model"] = {"name": args.model, "pretrained": args.pretrained}
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return 0


@entry_point
def bench_main(argv: list[str] | None = None) -> int:
    argv = list(argv or [])
    root = Path(__file__).resolve().parent.parent / "benchmarks"
    if not argv or argv[0] in ("-h", "--help"):
        names = sorted(p.stem[6:] for p in root.glob("bench_*.py")) if root.is_dir() else []
        print(f"usage: clove-dist bench {{{','.join(names) or 'loss,negatives'}}} [args]")
        return 0 if argv else 2
    script = root / f"bench_{argv[0]}.py"
    if not script.is_file():
        raise UserError(f"bench: no benchmark {argv[0]!r} at {script} (benchmarks ship with a source checkout)")
    sys.argv = [str(script), *argv[1:]]
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as e:
        return int(e.code or 0) if not isinstance(e.code, str) else 1
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    if argv[0] == "--version":
        from . import __version__
        print(__version__)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    if name == "eval":
        return eval_main(rest)
    if name == "bench":
        return bench_main(rest)
    import importlib
    module_name, _, func = COMMANDS[name][0].partition(":")
    return getattr(importlib.import_module(module_name), func or "main")(rest)


if __name__ == "__main__":
    raise SystemExit(main())
