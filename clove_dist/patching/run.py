"""`clove-dist patch --checkpoint RUN_DIR`: the in-run sharded export and patch, on demand, from a run's checkpoint.

    torchrun --nproc_per_node 8 -m clove_dist.cli patch --checkpoint runs/clove --alpha 0.4 0.6 0.8
    srun clove-dist patch --checkpoint runs/clove --tag step000004000 --out runs/clove/export-4000

Launched on a run's ranks (on another number of ranks too: the checkpoint then goes through DeepSpeed's universal
format first, as a resumed run's would), it builds the run's model and DeepSpeed engine from the run's config,
loads the checkpoint (the one `latest` names, or --tag), and every rank writes the fp32 master values it owns into
finetuned.safetensors and one patched_alpha<A>.safetensors per alpha (patching/sharded.py): no rank holds a whole
model. The pre-trained weights are the run's model.pretrained unless --pretrained names others. Default output:
RUN_DIR/export/<tag>/, beside the end-of-run export, never over it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from .stream import PatchError, check_output, patched_name


def run_config_path(run_dir: Path, tag: str | None) -> Path:
    """The config the run had at `tag`: config.yaml, or the newest config.<T>.yaml a resume wrote at T <= tag."""
    changed = sorted(p for p in run_dir.glob("config.step*.yaml") if tag is None or p.name[7:-5] <= tag)
    return changed[-1] if changed else run_dir / "config.yaml"


def outputs(out_dir: Path, alphas: Sequence[float]) -> list[Path]:
    return [out_dir / "finetuned.safetensors", *(out_dir / patched_name(a) for a in alphas)]


def patch_run(run_dir: str, alphas: Sequence[float], *, tag: str | None = None, out: str = "",
              pretrained: str = "", overrides: Sequence[str] = (), overwrite: bool = False,
              allow_extrapolation: bool = False) -> list[Path]:
    """Load RUN_DIR's checkpoint on every rank and write its export and patches sharded (a collective)."""
    from ..checkpoint import TAG_PATTERN, Checkpointer
    from ..config import load_config
    from ..train import Trainer
    run = Path(run_dir)
    if not (run / "config.yaml").is_file() or not (run / "checkpoints").is_dir():
        raise PatchError(f"--checkpoint {run_dir} is not a run directory (it needs config.yaml and checkpoints/)")
    if tag is not None and not TAG_PATTERN.fullmatch(tag):
        raise PatchError(f"--tag {tag!r} is not a checkpoint tag (stepNNNNNNNNN)")
    found_tag = tag or Checkpointer(run / "checkpoints", keep_last=0).latest()
    if found_tag is None:
        raise PatchError(f"{run / 'checkpoints'} holds no complete checkpoint")
    if not (run / "checkpoints" / found_tag).is_dir():
        raise PatchError(f"{run / 'checkpoints' / found_tag}: no such checkpoint in this run")
    out_dir = Path(out) if out else run / "export" / found_tag
    for path in outputs(out_dir, alphas):
        check_output(path, overwrite)
    cfg = load_config(run_config_path(run, found_tag), [
        f"run.output_dir={run.resolve().parent}", f"run.name={run.name}",
        f"checkpoint.resume={run / 'checkpoints' / found_tag}", *overrides])
    trainer = Trainer(cfg)
    trainer.build_engine()
    from .sharded import export_sharded
    return export_sharded(trainer.clip, trainer.original_shapes, cfg.model.name,
                          pretrained or cfg.model.pretrained or None, alphas, out_dir, seed=cfg.run.seed,
                          model_cfg=cfg.model, engine=trainer.engine, allow_extrapolation=allow_extrapolation)
