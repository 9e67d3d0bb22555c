"""BatchNorm statistics of patched ResNet CLIPs, computed again from shard images: against plain-torch statistics
of the same images, identical from `clove-dist sweep` and `clove-dist patch`, the two ends untouched, and one clear
line for every misuse."""
from __future__ import annotations

import copy
import io
import tarfile

import open_clip
import pytest
import torch
from safetensors.torch import load_file, save_file

import clove_dist.model  # noqa: F401  (registers clove-tiny-rn and clove-micro)
from clove_dist.cli import main as cli_main
from clove_dist.patching.batchnorm import read_images, recompute_batchnorm
from clove_dist.patching.stream import PatchError

BN_STATS = ("running_mean", "running_var")


def _bn_layers(module):
    return {n: m for n, m in module.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}


def _reference_statistics(visual, images, batch_size):
    """Per BatchNorm layer, the mean over batches of each batch's per-channel mean and unbiased variance of the
    layer's input, the network run in training mode (each layer normalising with its batch's statistics)."""
    net = copy.deepcopy(visual).train()
    seen: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {n: [] for n in _bn_layers(net)}
    hooks = [m.register_forward_pre_hook(
        lambda mod, args, name=n: seen[name].append((args[0].mean(dim=(0, 2, 3)),
                                                     args[0].transpose(0, 1).flatten(1).var(dim=1, unbiased=True))))
        for n, m in _bn_layers(net).items()]
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            net(images[i:i + batch_size])
    for h in hooks:
        h.remove()
    return {n: (torch.stack([m for m, _ in v]).mean(0), torch.stack([s for _, s in v]).mean(0))
            for n, v in seen.items()}


@pytest.mark.parametrize("num_images,batch_size", [(80, 32), (7, 64)])  # a short last batch; one batch
def test_recompute_matches_plain_torch_statistics(num_images, batch_size):
    torch.manual_seed(0)
    model = open_clip.create_model("clove-tiny-rn").eval()
    images = torch.randn(num_images, 3, 64, 64) * 0.7 + 0.2
    want = _reference_statistics(model.visual, images, batch_size)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert recompute_batchnorm(model, images, batch_size) == len(want) > 0
    assert not model.training and not model.visual.training  # the caller's mode is kept
    after = model.state_dict()
    for name, layer in _bn_layers(model.visual).items():
        # fp32 reductions over at most 80 x 32 x 32 values, summed in another order than the reference: 1e-5
        torch.testing.assert_close(layer.running_mean, want[name][0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer.running_var, want[name][1], rtol=1e-5, atol=1e-5)
        assert not torch.equal(layer.running_mean, before[f"visual.{name}.running_mean"])
    for k, v in before.items():  # weights, and everything outside BatchNorm statistics, untouched
        if not k.endswith(("running_mean", "running_var", "num_batches_tracked")):
            assert torch.equal(after[k], v), k


def test_a_model_without_batchnorm_is_left_alone():
    torch.manual_seed(0)
    model = open_clip.create_model("clove-micro")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert recompute_batchnorm(model, torch.randn(4, 3, 32, 32)) == 0
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.fixture(scope="module")
def rn_weights(tmp_path_factory):
    d = tmp_path_factory.mktemp("rn_weights")
    for name, seed in (("a", 0), ("b", 1)):
        torch.manual_seed(seed)
        model = open_clip.create_model("clove-tiny-rn")
        with torch.no_grad():  # distinct statistics in each input, as two trained models have
            for layer in _bn_layers(model.visual).values():
                layer.running_mean.uniform_(-1, 1)
                layer.running_var.uniform_(0.5, 2)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, d / f"{name}.safetensors")
    return d


def test_sweep_and_patch_write_the_same_recomputed_statistics(world, rn_weights, tmp_path, capsys):
    a, b = str(rn_weights / "a.safetensors"), str(rn_weights / "b.safetensors")
    bn = ["--bn-shards", world.train_pattern, "--bn-images", "40"]
    assert cli_main(["sweep", "--model", "clove-tiny-rn", "--pretrained", a, "--finetuned", b, "--alphas", "0",
                     "0.5", "1", "--sugarcrepe", world.sugarcrepe_dir, "--zeroshot", world.zeroshot_dir,
                     "--out", str(tmp_path / "sweep"), "--device", "cpu", "--save-patched", *bn]) == 0
    assert "from 40 images" in capsys.readouterr().err
    assert cli_main(["patch", "--model", "clove-tiny-rn", "--pretrained", a, "--finetuned", b, "--alpha", "0.5",
                     "--out", str(tmp_path / "patched.safetensors"), *bn]) == 0
    assert "WARNING" not in capsys.readouterr().err
    assert cli_main(["patch", "--pretrained", a, "--finetuned", b, "--alpha", "0.5",
                     "--out", str(tmp_path / "plain.safetensors")]) == 0
    err = capsys.readouterr().err
    assert "WARNING: the model has" in err and "BatchNorm layers" in err and "--bn-shards" in err

    swept = load_file(tmp_path / "sweep" / "patched_alpha0.5.safetensors")
    patched = load_file(tmp_path / "patched.safetensors")
    plain = load_file(tmp_path / "plain.safetensors")
    assert set(swept) == set(patched) == set(plain)
    stats = [k for k in plain if k.endswith(BN_STATS)]
    assert stats
    for k in plain:
        torch.testing.assert_close(patched[k].reshape(swept[k].shape), swept[k], rtol=0, atol=0)  # one recipe
        if k.endswith(BN_STATS):
            assert not torch.allclose(patched[k], plain[k]), k  # computed again, not interpolated
        elif not k.endswith("num_batches_tracked"):
            assert torch.equal(patched[k], plain[k]), k  # every weight is the interpolation
    ends = {0: load_file(a), 1: load_file(b)}
    for alpha, state in ends.items():  # the two ends are the inputs as they are
        written = load_file(tmp_path / "sweep" / f"patched_alpha{alpha}.safetensors")
        assert all(torch.equal(written[k].reshape(v.shape), v) for k, v in state.items())

    # the images behind the statistics: those of the shards in order, through the evaluation transform
    _, _, preprocess = open_clip.create_model_and_transforms("clove-tiny-rn")
    pixels, skipped = read_images(world.train_pattern, preprocess, 40)
    assert pixels.shape == (40, 3, 64, 64) and skipped == 0
    model = open_clip.create_model("clove-tiny-rn")
    model.load_state_dict(plain)
    recompute_batchnorm(model, pixels)
    for k in stats:
        torch.testing.assert_close(model.state_dict()[k], patched[k], rtol=0, atol=0)


def _tar(path, members: dict[str, bytes]) -> str:
    with tarfile.open(path, "w") as t:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return str(path)


def test_bad_image_shards_are_counted_or_refused(world, tmp_path):
    _, _, preprocess = open_clip.create_model_and_transforms("clove-tiny-rn")
    corrupt = tmp_path / "corrupt.tar"
    corrupt.write_bytes(b"not a tar file" * 100)
    text_only = _tar(tmp_path / "text.tar", {"0.txt": b"a red circle", "1.jpg": b"not a jpeg"})
    first = world.train_pattern.replace("{00000..00003}", "00000")
    pixels, skipped = read_images(f"{corrupt}::{text_only}::{first}", preprocess, 10)
    assert len(pixels) == 10 and skipped == 3  # the unreadable shard, the sample without an image, the bad JPEG
    with pytest.raises(PatchError, match="no decodable image"):
        read_images(text_only, preprocess, 10)


def test_misuse_gets_one_line(rn_weights, world, tmp_path, capsys):
    a, b = str(rn_weights / "a.safetensors"), str(rn_weights / "b.safetensors")
    cases = [
        (["patch", "--pretrained", a, "--finetuned", b, "--out", str(tmp_path / "x.safetensors"),
          "--bn-shards", world.train_pattern], "--bn-shards needs --model"),
        (["patch", "--checkpoint", str(tmp_path), "--model", "clove-tiny-rn", "--bn-shards", world.train_pattern],
         "--bn-shards works offline"),
        (["patch", "--pretrained", a, "--finetuned", b, "--out", str(tmp_path / "y.safetensors"), "--model",
          "clove-tiny-rn", "--bn-shards", str(tmp_path / "none-*.tar")], "matched no shard files"),
    ]
    for argv, message in cases:
        assert cli_main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "y.safetensors").exists()  # refused before anything is written


def test_in_run_export_of_a_batchnorm_model_says_how_to_recompute(rn_weights, tmp_path, capsys):
    """The export at the end of training interpolates every tensor; for a BatchNorm model it says so, once."""
    from clove_dist.model import make_deepspeed_safe
    from clove_dist.patching import export_sharded
    clip = open_clip.create_model("clove-tiny-rn")
    shapes = make_deepspeed_safe(clip)
    export_sharded(clip, shapes, "clove-tiny-rn", str(rn_weights / "a.safetensors"), [0.0, 1.0], tmp_path / "ends",
                   seed=0)
    assert "BatchNorm" not in capsys.readouterr().err  # the two ends are exact
    export_sharded(clip, shapes, "clove-tiny-rn", str(rn_weights / "a.safetensors"), [0.6], tmp_path / "mid", seed=0)
    err = capsys.readouterr().err
    assert "WARNING: the model has" in err and "clove-dist patch --model ... --bn-shards" in err
