"""Patching: w = (1 - alpha) * pretrained + alpha * finetuned, streamed into safetensors that open_clip loads."""
from __future__ import annotations

import open_clip
import pytest
import torch
from safetensors.torch import load_file, save_file

import clove_dist.model  # noqa: F401  (registers clove-micro / clove-tiny with open_clip)
from clove_dist.cli import main as cli_main
from clove_dist.patching import PatchError, patch_files, save_state, streaming_writer


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("pair")
    torch.manual_seed(0)
    a = open_clip.create_model("clove-micro").state_dict()
    torch.manual_seed(1)
    b = open_clip.create_model("clove-micro").state_dict()
    b["logit_scale"] = b["logit_scale"].reshape(1) + 0.5  # a DeepSpeed-shaped [1] scalar must still match
    save_file({k: v.contiguous() for k, v in a.items()}, d / "a.safetensors")
    torch.save(b, d / "b.pt")
    return d, a, b


@pytest.mark.parametrize("alpha", [0.0, 0.6, 1.0])
def test_patch_matches_plain_arithmetic_and_loads_in_open_clip(pair, alpha):
    d, a, b = pair
    out = patch_files(str(d / "a.safetensors"), str(d / "b.pt"), alpha, str(d / f"p{alpha}.safetensors"),
                      progress=False)
    got = load_file(str(out))
    assert got.keys() == a.keys()
    for k in a:
        expected = (1 - alpha) * a[k].double() + alpha * b[k].reshape(a[k].shape).double()
        # fp32 lerp vs the fp64 formula: one rounding of a value of magnitude <= ~5, i.e. below 1e-6 absolute
        torch.testing.assert_close(got[k].double(), expected, rtol=0, atol=1e-6)
        assert got[k].dtype == a[k].dtype and got[k].shape == a[k].shape
    if alpha == 0.0:
        assert all(torch.equal(got[k], a[k]) for k in a)  # the endpoints are exact
    model = open_clip.create_model("clove-micro", pretrained=str(out))
    assert torch.equal(model.logit_scale.detach(), got["logit_scale"])


def test_patch_cli_and_errors(pair, tmp_path, capsys):
    d, _, _ = pair
    assert cli_main(["patch", "--pretrained", str(d / "a.safetensors"), "--finetuned", str(d / "b.pt"),
                     "--alpha", "0.6", "--out", str(tmp_path / "c.safetensors")]) == 0
    assert (tmp_path / "c.safetensors").is_file()
    assert cli_main(["patch", "--pretrained", str(d / "a.safetensors"), "--finetuned", str(d / "b.pt"),
                     "--alpha", "0", "0.5", "--out", str(tmp_path / "sweep")]) == 0
    assert sorted(p.name for p in (tmp_path / "sweep").iterdir()) == ["patched_alpha0.5.safetensors",
                                                                       "patched_alpha0.safetensors"]
    capsys.readouterr()

    other = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in open_clip.create_model("clove-tiny").state_dict().items()}, other)
    cases = [
        (["--finetuned", str(other)], "checkpoints are of different models"),
        (["--alpha", "1.5"], "alpha must be in [0, 1], got 1.5"),
        (["--finetuned", str(tmp_path / "missing.pt")], "checkpoint not found"),
    ]
    for extra, needle in cases:
        args = {"--pretrained": str(d / "a.safetensors"), "--finetuned": str(d / "b.pt"), "--alpha": "0.6",
                "--out": str(tmp_path / "bad.safetensors")}
        args.update(dict(zip(extra[::2], extra[1::2])))
        assert cli_main(["patch", *[x for kv in args.items() for x in kv]]) == 2
        err = capsys.readouterr().err
        assert needle in err and err.count("\n") == 1, err
        assert not (tmp_path / "bad.safetensors").exists()  # nothing half-written under the final name
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert cli_main(["patch", "--pretrained", str(tmp_path / "junk.pt"), "--finetuned", str(d / "b.pt"),
                     "--out", str(tmp_path / "bad.safetensors")]) == 2
    assert "cannot read checkpoint" in capsys.readouterr().err


def test_interrupted_write_leaves_no_file(tmp_path):
    state = {"w": torch.ones(3, 2), "b": torch.zeros(2)}
    specs = [(k, tuple(v.shape), v.dtype) for k, v in state.items()]
    with pytest.raises(KeyboardInterrupt):
        with streaming_writer(tmp_path / "x.safetensors", specs) as w:
            w.write("w", state["w"])
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    save_state(state, tmp_path / "x.safetensors")
    got = load_file(str(tmp_path / "x.safetensors"))
    assert all(torch.equal(got[k], state[k]) for k in state)


def test_bad_input_one_line_nonzero_exit_nothing_written(pair, tmp_path, capsys):
    """Each user mistake: one line on stderr, exit 2, and the output directory stays as it was."""
    d, _, _ = pair
    other = tmp_path / "in" / "tiny.safetensors"
    other.parent.mkdir()
    save_file({k: v.contiguous() for k, v in open_clip.create_model("clove-tiny").state_dict().items()}, other)
    not_ckpt = tmp_path / "in" / "notackpt"
    not_ckpt.mkdir()
    (not_ckpt / "readme.txt").write_text("hello")
    out = tmp_path / "out"
    out.mkdir()
    existing = out / "exists.safetensors"
    existing.write_bytes(b"keep me")
    base = ["patch", "--pretrained", str(d / "a.safetensors"), "--finetuned", str(d / "b.pt")]
    cases = [
        (base[:3] + ["--finetuned", str(other), "--out", str(out / "x.safetensors")],
         "checkpoints are of different models"),
        (base[:3] + ["--finetuned", str(not_ckpt), "--out", str(out / "x.safetensors")],
         "is not a DeepSpeed checkpoint directory"),
        (base + ["--alpha", "-0.1", "--out", str(out / "x.safetensors")], "--allow-extrapolation"),
        (base + ["--alpha", "0.2", "1.2", "--out", str(out / "several")], "alpha must be in [0, 1], got 1.2"),
        (base + ["--out", str(existing)], "exists; pass --overwrite"),
        (["export", str(not_ckpt), "--out", str(out / "x.safetensors")], "is not a DeepSpeed checkpoint directory"),
        (["export", str(d / "b.pt"), "--out", str(existing)], "exists; pass --overwrite"),
    ]
    for argv, needle in cases:
        assert cli_main(argv) == 2, argv
        err = capsys.readouterr().err
        assert needle in err and err.count("\n") == 1, (argv, err)
        assert sorted(p.name for p in out.iterdir()) == ["exists.safetensors"], argv
        assert existing.read_bytes() == b"keep me"


def test_extrapolation_and_overwrite_when_asked(pair, tmp_path):
    d, a, b = pair
    out = tmp_path / "x.safetensors"
    out.write_bytes(b"old")
    assert cli_main(["patch", "--pretrained", str(d / "a.safetensors"), "--finetuned", str(d / "b.pt"),
                     "--alpha", "1.5", "--allow-extrapolation", "--overwrite", "--out", str(out)]) == 0
    got = load_file(str(out))
    for k in a:
        expected = a[k].double() + 1.5 * (b[k].reshape(a[k].shape).double() - a[k].double())
        # one fp32 rounding of a lerp of magnitude <= ~10: well below 1e-5
        torch.testing.assert_close(got[k].double(), expected, rtol=0, atol=1e-5)


def test_export_restores_open_clip_shapes_from_a_consolidated_file(pair, tmp_path):
    """zero_to_fp32 writes `clip.`-prefixed keys and a [1]-shaped logit_scale; the export loads in open_clip."""
    d, _, b = pair
    torch.save({"clip." + k: v for k, v in b.items()} | {"loss_fn.dummy": torch.zeros(2)}, tmp_path / "c.bin")
    assert cli_main(["export", str(tmp_path / "c.bin"), "--out", str(tmp_path / "e.safetensors")]) == 0
    got = load_file(str(tmp_path / "e.safetensors"))
    assert sorted(got) == sorted(b) and got["logit_scale"].shape == torch.Size([])
    model = open_clip.create_model("clove-micro", pretrained=str(tmp_path / "e.safetensors"))
    assert torch.equal(model.logit_scale.detach().reshape(1), b["logit_scale"])


def test_export_sharded_without_distributed_equals_offline_patch(pair, tmp_path):
    """One process, no engine (ZeRO-0 / debug mode): rank 0 owns every tensor; logit_scale back to 0-dim."""
    from clove_dist.model import make_deepspeed_safe
    from clove_dist.patching import export_sharded, patched_name
    d, a, _ = pair
    torch.manual_seed(5)
    clip = open_clip.create_model("clove-micro")
    shapes = make_deepspeed_safe(clip)
    paths = export_sharded(clip, shapes, "clove-micro", str(d / "a.safetensors"), [0.0, 0.6], tmp_path / "e", seed=0)
    assert [p.name for p in paths] == ["finetuned.safetensors", patched_name(0.0), patched_name(0.6)]
    fine = load_file(str(paths[0]))
    assert fine["logit_scale"].shape == torch.Size([])
    assert all(torch.equal(fine[k].reshape(-1), v.detach().reshape(-1)) for k, v in clip.state_dict().items())
    offline = patch_files(str(d / "a.safetensors"), str(paths[0]), 0.6, str(tmp_path / "o.safetensors"),
                          progress=False)
    got, want = load_file(str(paths[2])), load_file(str(offline))
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert all(torch.equal(load_file(str(paths[1]))[k], a[k]) for k in a)
    # a .pt pre-trained file (with DDP's `module.` prefix) gives the same bytes through a temporary safetensors copy
    torch.save({"module." + k: v for k, v in a.items()}, tmp_path / "a.pt")
    pt_paths = export_sharded(clip, shapes, "clove-micro", str(tmp_path / "a.pt"), [0.6], tmp_path / "pt", seed=0)
    got = load_file(str(pt_paths[1]))
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert sorted(p.name for p in (tmp_path / "pt").iterdir()) == [
        "finetuned.safetensors", "open_clip_config.json", patched_name(0.6)]
    # pre-trained weights of another architecture: one-line error before anything is written
    tiny = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in open_clip.create_model("clove-tiny").state_dict().items()}, tiny)
    with pytest.raises(PatchError, match="are of a different model"):
        export_sharded(clip, shapes, "clove-micro", str(tiny), [0.6], tmp_path / "bad", seed=0)
    assert not list((tmp_path / "bad").glob("*.safetensors*"))
    # no weights file: the pre-trained side is the init the seed gives, rebuilt, and its copy is removed
    paths = export_sharded(clip, shapes, "clove-micro", None, [0.0], tmp_path / "r", seed=0)
    got = load_file(str(paths[1]))
    assert all(torch.equal(got[k], a[k]) for k in a)  # `pair` made a.safetensors from seed 0
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == [
        "finetuned.safetensors", "open_clip_config.json", patched_name(0.0)]
