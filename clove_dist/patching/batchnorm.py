"""BatchNorm statistics of a patched model, computed again from images.

Interpolating two networks' weights interpolates the running mean and variance of their BatchNorm layers like any
other tensor, but those no longer describe what the interpolated weights compute: between the two ends the layers
normalise with the wrong statistics. ResNet CLIPs (OpenAI's RN50 family, clove-tiny-rn) have BatchNorm in the image
tower; for them the statistics of a patched model are computed again from a few thousand images, as stochastic
weight averaging does after averaging weights (torch.optim.swa_utils.update_bn). ViTs have no BatchNorm, and
nothing here applies to them.

    clove-dist sweep ... --bn-shards '/data/laion-coco/{00000..00003}.tar' --bn-images 2048
    clove-dist patch ... --model RN50 --bn-shards '/data/laion-coco/{00000..00003}.tar'

The images are the first `--bn-images` of the shards in order, through the model's evaluation transform: the same
shards give the same statistics in both commands. They are held in memory as floats (2,048 images at 224 px: 1.2
GB) and go to the model's device a batch at a time.
"""
from __future__ import annotations

import io
from collections.abc import Callable

import torch
from PIL import Image

from .stream import PatchError

RUNNING_STAT_SUFFIX = ".running_mean"


def batchnorm_layers(state_keys) -> list[str]:
    """Names of the BatchNorm layers in a state dict's keys (those with a running mean)."""
    return [k[: -len(RUNNING_STAT_SUFFIX)] for k in state_keys if k.endswith(RUNNING_STAT_SUFFIX)]


def interpolated_statistics_warning(state_keys, option: str = "--bn-shards") -> str | None:
    """One line for a patch of a BatchNorm model whose statistics are interpolated, not recomputed; None
    without BatchNorm."""
    layers = batchnorm_layers(state_keys)
    if not layers:
        return None
    return (f"the model has {len(layers)} BatchNorm layers: between alpha 0 and 1 their interpolated running "
            f"statistics do not describe the interpolated weights; pass {option} to compute them again from images")


def wants_statistics(state_keys, bn_shards: str, alphas, model_name: str, say: Callable[[str], None]) -> bool:
    """Whether a patch at `alphas` computes BatchNorm statistics again from `bn_shards`. When it does not, `say`
    gets why where it matters: a model without BatchNorm given shards, or a BatchNorm model patched strictly
    between 0 and 1 without them."""
    if not batchnorm_layers(state_keys):
        if bn_shards:
            say(f"{model_name} has no BatchNorm layer: --bn-shards is not needed")
        return False
    if not bn_shards:
        if any(0 < a < 1 for a in alphas):
            say(f"WARNING: {interpolated_statistics_warning(state_keys)}")
        return False
    return True


def statistics_images(pattern: str, preprocess: Callable, num_images: int, say: Callable[[str], None]) -> torch.Tensor:
    """read_images, and one line through `say` of how many images the statistics come from."""
    images, skipped = read_images(pattern, preprocess, num_images)
    say(f"BatchNorm statistics of each patched model from {len(images)} images of {pattern}"
        + (f" ({skipped} skipped)" if skipped else ""))
    return images


def read_images(pattern: str, preprocess: Callable, num_images: int) -> tuple[torch.Tensor, int]:
    """The first `num_images` decodable images of the shards in order, preprocessed and stacked, and the number of
    samples skipped (no image part, or one that does not decode). PatchError when none is read."""
    import webdataset as wds

    from ..shards import expand_shards, image_of
    if num_images < 1:
        raise PatchError(f"--bn-images must be > 0, got {num_images}")
    urls = expand_shards(pattern, option="--bn-shards")
    corrupt: list[str] = []

    def on_error(exn: Exception) -> bool:
        corrupt.append(f"{type(exn).__name__}: {exn}")
        return True
    images, skipped = [], 0
    for sample in wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples(handler=on_error)):
        try:
            with Image.open(io.BytesIO(image_of(sample))) as img:
                images.append(preprocess(img.convert("RGB")))
        except Exception:  # no image part (image_of gives None), or one that does not decode: a counted skip
            skipped += 1
            continue
        if len(images) == num_images:
            break
    if not images:
        raise PatchError(f"--bn-shards {pattern!r}: no decodable image ({skipped} samples skipped, "
                         f"{len(corrupt)} unreadable shards{': ' + corrupt[0] if corrupt else ''})")
    return torch.stack(images), skipped + len(corrupt)


def recompute_batchnorm(model: torch.nn.Module, images: torch.Tensor, batch_size: int = 64) -> int:
    """Reset every BatchNorm layer of `model.visual` and average its statistics over `images` (equal weight per
    batch, as torch.optim.swa_utils.update_bn does); the model's mode is kept. Returns the number of layers."""
    visual = model.visual
    layers = [m for m in visual.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not layers:
        return 0
    device = next(visual.parameters()).device
    batches = [images[i:i + batch_size] for i in range(0, len(images), batch_size)]
    with torch.no_grad():
        torch.optim.swa_utils.update_bn(batches, visual, device=device)
    return len(layers)


def recompute_file_statistics(model: torch.nn.Module, path: str, images: torch.Tensor,
                              metadata: dict[str, str], batch_size: int = 64) -> int:
    """Rewrite the BatchNorm statistics of a patched weights file (`model`'s architecture) from `images`; every
    other tensor, and every dtype, stays as written. Returns the number of layers."""
    from .stream import open_weights, save_state
    src = open_weights(path)
    state = {k: src[k] for k in src}
    expected = model.state_dict()
    if set(expected) != set(state):
        raise PatchError(f"{path} does not hold the model's tensors ({len(set(expected) ^ set(state))} differ)")
    with torch.no_grad():
        for k, t in expected.items():
            t.copy_(state[k].reshape(t.shape))
    n = recompute_batchnorm(model, images, batch_size)
    recomputed = model.state_dict()
    for layer in batchnorm_layers(state):
        for key in (f"{layer}.running_mean", f"{layer}.running_var", f"{layer}.num_batches_tracked"):
            if key in state:
                state[key] = recomputed[key].to(state[key].dtype).reshape(state[key].shape)
    save_state(state, path, metadata)
    return n
