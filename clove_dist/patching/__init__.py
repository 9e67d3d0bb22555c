"""Patching by weight interpolation, and open_clip-loadable exports.

    w = (1 - alpha) * w_pretrained + alpha * w_finetuned        (alpha = 0.6 in the paper)

    stream.py      offline streaming patch of two weight files, one tensor at a time; the safetensors layout
    sharded.py     in-run export: every rank writes the ZeRO partition it owns (export_sharded, a collective)
    checkpoint.py  DeepSpeed checkpoints of any stage and world size read one parameter at a time
    commands.py    `clove-dist patch` (offline, or --checkpoint RUN_DIR sharded on a run's ranks), `clove-dist export`
    sweep.py       `clove-dist sweep`: evaluate many alphas, plot compositionality against zero-shot
    batchnorm.py   BatchNorm statistics of a patched model computed again from images (ResNet CLIPs)
"""
from .sharded import FINETUNED_NAME, export_sharded
from .stream import (PatchError, StreamingSafetensorsWriter, TensorSource, check_alpha, check_compatible,
                     interpolate_state, interpolate_tensor, patch_files, patched_name, save_state, streaming_writer)


def main(argv: list[str] | None = None) -> int:
    from .commands import patch_main
    return patch_main(argv)


__all__ = ["FINETUNED_NAME", "PatchError", "StreamingSafetensorsWriter", "TensorSource", "check_alpha",
           "check_compatible", "export_sharded", "interpolate_state", "interpolate_tensor", "main", "patch_files",
           "patched_name", "save_state", "streaming_writer"]
