"""`clove-dist patch` and `clove-dist export`: offline, one tensor at a time, from weights files or checkpoints.

    clove-dist patch --pretrained base.safetensors --finetuned runs/base/checkpoints/step000001000 --alpha 0.6 \\
        --out patched.safetensors
    clove-dist patch --pretrained base.safetensors --finetuned runs/base/export/finetuned.safetensors \\
        --alpha 0.2 0.4 0.6 --out patched/              # one patched_alpha<A>.safetensors per alpha
    clove-dist patch --pretrained rn50.safetensors --finetuned ft.safetensors --alpha 0.6 \\
        --out patched.safetensors --model RN50 --bn-shards '/data/laion-coco/{00000..00003}.tar'   # BatchNorm
    clove-dist export runs/base/checkpoints --out finetuned.safetensors      # the tag in `latest`, any ZeRO stage
    torchrun --nproc_per_node 8 -m clove_dist.cli patch --checkpoint runs/base --alpha 0.6   # on the run's ranks

With --checkpoint RUN_DIR the patch runs on the ranks it is launched on (the run's, or another number of them: the
checkpoint then goes through DeepSpeed's universal format first, as a resumed run's would): it builds the run's
model and engine from the run's config, loads the checkpoint (`latest`, or --tag), and every rank writes the fp32
master values it owns, as at the end of training (patching/sharded.py), into RUN_DIR/export/<tag>/ unless --out.
Rank 0 takes every decision (tag, config, existing outputs) and holds the run's lock meanwhile, so it neither races
a live run (which could prune the checkpoint it reads) nor another patch. The pre-trained weights are the run's
model.pretrained unless --pretrained names others. Without --checkpoint the patch runs offline in one process.

Inputs: .safetensors/.pt/.bin weights, a DeepSpeed checkpoint directory (any stage, any world size), or the
consolidated file DeepSpeed's zero_to_fp32 writes. Outputs load with `open_clip.create_model(name,
pretrained=path)`. Every check (alpha, architectures, existing outputs) runs before the first byte is written.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm import tqdm

from ..errors import entry_point
from .batchnorm import recompute_file_statistics, statistics_images, wants_statistics
from .checkpoint import open_clip_shape
from .stream import (PatchError, check_alpha, check_compatible, check_output, open_weights, patch_files,
                     patched_name, streaming_writer)


@entry_point
def patch_main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="clove-dist patch", description=__doc__.split("\n\n")[0])
    ap.add_argument("--pretrained", default="",
                    help="pre-trained weights (.safetensors/.pt/.bin); with --checkpoint, default: the run's")
    ap.add_argument("--finetuned", default="",
                    help="fine-tuned weights of the same architecture, or a DeepSpeed checkpoint directory")
    ap.add_argument("--checkpoint", default="", metavar="RUN_DIR",
                    help="patch a run's checkpoint on the ranks this is launched on (torchrun/srun), sharded")
    ap.add_argument("--tag", default=None, help="with --checkpoint: the checkpoint tag (default: `latest`)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="with --checkpoint: override a key of the run's config, e.g. run.device=cpu")
    ap.add_argument("--alpha", type=float, nargs="+", default=[0.6], help="interpolation weight(s) of the fine-tuned")
    ap.add_argument("--out", default="",
                    help="output .safetensors (several alphas: a directory receiving patched_alpha<A>.safetensors); "
                         "with --checkpoint, a directory (default: RUN_DIR/export/<tag>)")
    ap.add_argument("--allow-extrapolation", action="store_true", help="accept alphas outside [0, 1]")
    ap.add_argument("--overwrite", action="store_true", help="replace outputs that exist")
    ap.add_argument("--model", default="", help="open_clip architecture of the weights (needed by --bn-shards)")
    ap.add_argument("--bn-shards", default="",
                    help="webdataset shards whose images give the patched model's BatchNorm statistics "
                         "(models with BatchNorm, e.g. ResNet CLIPs; see patching/batchnorm.py)")
    ap.add_argument("--bn-images", type=int, default=2048, help="images read from --bn-shards (default 2048)")
    args = ap.parse_args(argv)
    alphas = [check_alpha(a, args.allow_extrapolation) for a in args.alpha]
    if args.bn_shards and not args.model:
        raise PatchError("patch: --bn-shards needs --model NAME (the architecture whose BatchNorm layers run)")
    if args.checkpoint:
        if args.bn_shards:
            raise PatchError("patch --checkpoint: --bn-shards works offline; patch the run's export "
                             "(RUN_DIR/export/<tag>/finetuned.safetensors) with --pretrained/--finetuned")
        return _patch_run(args, alphas)
    if not (args.pretrained and args.finetuned):
        raise PatchError("patch: give --pretrained A and --finetuned B, or --checkpoint RUN_DIR")
    if args.tag or args.overrides:
        raise PatchError("patch: --tag and --set go with --checkpoint RUN_DIR")
    if not args.out:
        raise PatchError("patch: give --out")
    if len(alphas) == 1 and str(args.out).endswith(".safetensors"):
        outs = [Path(args.out)]
    else:
        if Path(args.out).is_file():
            raise PatchError(f"--out {args.out} is a file; several alphas need a directory")
        outs = [Path(args.out) / patched_name(a) for a in alphas]
    for out in outs:
        check_output(out, args.overwrite)
    pre = open_weights(args.pretrained)
    check_compatible(pre, open_weights(args.finetuned), shape_of=lambda src, k: src.shape_dtype(k)[0])
    bn = _batchnorm_inputs(args) if wants_statistics(pre, args.bn_shards, alphas, args.model, _say) else None
    for a, out in zip(alphas, outs):
        patch_files(args.pretrained, args.finetuned, a, str(out), allow_extrapolation=args.allow_extrapolation,
                    overwrite=True)
        if bn is not None and 0 < a < 1:
            model, pixels = bn
            recompute_file_statistics(model, str(out), pixels, {
                "alpha": str(a), "pretrained": Path(args.pretrained).name, "finetuned": Path(args.finetuned).name,
                "bn_shards": args.bn_shards, "bn_images": str(len(pixels))})
        print(out)
    return 0


def _say(line: str) -> None:
    print(line, file=sys.stderr)


def _batchnorm_inputs(args):
    """(model, images) for recomputing BatchNorm statistics: args.model built on CPU, images from args.bn_shards."""
    from ..config import ModelConfig
    from ..model import create
    model, _, preprocess, _ = create(ModelConfig(name=args.model))
    return model, statistics_images(args.bn_shards, preprocess, args.bn_images, _say)


def _patch_run(args, alphas: list[float]) -> int:
    from .. import dist as cdist
    from ..checkpoint import TAG_PATTERN, Checkpointer
    from ..config import load_config
    from ..run_lock import RunLock
    from ..train import config_file_for
    if args.finetuned:
        raise PatchError("patch: --checkpoint RUN_DIR is the fine-tuned model; drop --finetuned")
    if args.out.endswith(".safetensors"):
        raise PatchError("patch --checkpoint: --out is a directory (finetuned.safetensors, patched_alpha<A>...)")
    if args.tag is not None and not TAG_PATTERN.fullmatch(args.tag):
        raise PatchError(f"--tag {args.tag!r} is not a checkpoint tag (stepNNNNNNNNN)")
    run = Path(args.checkpoint)
    if not (run / "config.yaml").is_file() or not (run / "checkpoints").is_dir():
        raise PatchError(f"--checkpoint {run} is not a run directory (it needs config.yaml and checkpoints/)")
    first = load_config(run / "config.yaml", args.overrides)  # the launch settings: device, backend, timeout
    cdist.setup(first.run.device, first.distributed.backend, first.distributed.timeout_minutes)
    held: list[RunLock] = []

    def plan() -> tuple[str, str, str]:  # rank 0 decides for every rank
        held.append(RunLock.acquire(run, hint="wait for it to end, or patch a checkpoint of it offline "
                                              "(clove-dist patch --pretrained A --finetuned RUN_DIR/checkpoints)"))
        tag = args.tag or Checkpointer(run / "checkpoints", 0).latest()
        if tag is None:
            raise PatchError(f"{run / 'checkpoints'} holds no complete checkpoint")
        if not (run / "checkpoints" / tag).is_dir():
            raise PatchError(f"{run / 'checkpoints' / tag}: no such checkpoint in this run")
        out_dir = Path(args.out) if args.out else run / "export" / tag
        for path in [out_dir / "finetuned.safetensors", *(out_dir / patched_name(a) for a in alphas)]:
            check_output(path, args.overwrite)
        return tag, str(config_file_for(run, tag)), str(out_dir)
    try:
        tag, config_path, out_dir = cdist.from_rank0(plan)
        written = _export_checkpoint(run, tag, Path(config_path), Path(out_dir), alphas, args)
    finally:
        for lock in held:
            lock.release()
    if cdist.rank() == 0:
        print("\n".join(str(p) for p in written))
    return 0


def _export_checkpoint(run: Path, tag: str, config_path: Path, out_dir: Path, alphas: list[float],
                       args) -> list[Path]:
    """Every rank: the run's engine, loaded from `tag`, exported and patched sharded (a collective)."""
    from ..config import load_config
    from ..train import Trainer
    from .sharded import export_sharded
    # --pretrained before the user's --set: it also stands in for a model.pretrained file that has moved since
    pretrained = [f"model.pretrained={args.pretrained}"] if args.pretrained else []
    cfg = load_config(config_path, [f"run.output_dir={run.resolve().parent}", f"run.name={run.resolve().name}",
                                    f"checkpoint.resume={run / 'checkpoints' / tag}", *pretrained, *args.overrides])
    trainer = Trainer(cfg)
    trainer.build_engine()
    return export_sharded(trainer.clip, trainer.original_shapes, cfg.model.name, cfg.model.pretrained or None,
                          alphas, out_dir, seed=cfg.run.seed, model_cfg=cfg.model, engine=trainer.engine,
                          allow_extrapolation=args.allow_extrapolation)


def export_file(source: str, out: str, *, overwrite: bool = False, progress: bool = True) -> Path:
    """The fp32 weights of a checkpoint (or weights file) as one open_clip-loadable .safetensors."""
    check_output(out, overwrite)
    src = open_weights(source)
    # logit_scale as open_clip shapes it (0-dim), whatever shape DeepSpeed gave it ([1])
    specs = [(k, open_clip_shape(k, src.shape_dtype(k)[0]), src.shape_dtype(k)[1]) for k in src]
    with streaming_writer(out, specs, {"source": str(source)}) as w:
        for k, shape, _ in tqdm(specs, desc="export", unit="tensor", disable=not progress):
            w.write(k, src[k].reshape(shape))
    return Path(out)


@entry_point
def export_main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="clove-dist export",
                                 description="Write the fp32 weights of a DeepSpeed checkpoint as .safetensors.")
    ap.add_argument("checkpoint", help="a run's checkpoints/ directory (its `latest` tag) or one tag directory, "
                                       "or zero_to_fp32's consolidated file")
    ap.add_argument("--out", required=True, help="output .safetensors")
    ap.add_argument("--overwrite", action="store_true", help="replace the output if it exists")
    args = ap.parse_args(argv)
    print(export_file(args.checkpoint, args.out, overwrite=args.overwrite))
    return 0
