"""Retrieval Recall@K in CLIP_benchmark's webdataset layout, against hand-computed cases and a direct computation.

The table model (test_eval.TableModel) returns features chosen by the test, so every recall is known; the tiny
open_clip model on the synthetic world is checked against CLIP_benchmark's procedure written out here
(torch.topk over the full score matrix, one image or text at a time).
"""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clove_dist.cli import main as cli_main
from clove_dist.eval import retrieval, zeroshot
from test_eval import TableModel, TableTokenizer, id_preprocess, small_world, tiny_clip  # noqa: F401 (fixtures)


def _png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (i, 0, 0)).save(buf, format="PNG")
    return buf.getvalue()


def write_retrieval_set(root: Path, samples: list[tuple[str, dict[str, bytes]]], per_shard: int = 2) -> None:
    """A set as clip_benchmark_export_wds --retrieval writes it."""
    (root / "test").mkdir(parents=True)
    (root / "dataset_type.txt").write_text("retrieval\n")
    shards = [samples[i:i + per_shard] for i in range(0, len(samples), per_shard)]
    for n, shard in enumerate(shards):
        with tarfile.open(root / "test" / f"{n}.tar", "w") as tar:
            for key, files in shard:
                for ext, data in files.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    (root / "test" / "nshards.txt").write_text(f"{len(shards)}\n")


def _table_case(root: Path, image_vecs: np.ndarray, captions: list[list[str]], text_vecs: dict[str, np.ndarray]):
    samples = [(f"s{i:07d}", {"png": _png(i), "txt": "\n".join(caps).encode()}) for i, caps in enumerate(captions)]
    write_retrieval_set(root, samples)
    texts = list(text_vecs)
    model = TableModel(image_vecs, np.stack([text_vecs[t] for t in texts]))
    return model, TableTokenizer(texts)


def test_hand_computed_recalls(tmp_path):
    e = np.eye(3)
    images = np.stack([e[0], 2.0 * e[1], 0.5 * e[2]])  # norms differ: only cosines may decide
    # Captions per image; the comment gives each caption's image ranking (cosine, best first).
    captions = [["a", "b"], ["c", "f"], ["d", "g"]]
    vecs = {
        "a": e[0],                    # img0 first: t2i hit @1
        "b": 0.9 * e[1] + 0.1 * e[0],  # img1, img0: its image is 2nd -> miss @1, hit @5
        "c": e[1],                    # img1 first: hit @1
        "f": 0.7 * e[2] + 0.3 * e[1],  # img2, img1: 2nd -> miss @1
        "d": 0.8 * e[0] + 0.2 * e[2],  # img0, img2: 2nd -> miss @1
        "g": 0.6 * e[2] + 0.8 * e[1],  # img1 (0.8), img2 (0.6): 2nd -> miss @1
    }
    model, tok = _table_case(tmp_path, images, captions, vecs)
    res = retrieval.evaluate(model, id_preprocess, tok, tmp_path, batch_size=2)
    # t2i: a, c hit at 1 of 6 captions; every caption's image is within the top 3 = all images.
    assert res["text_to_image_R@1"] == pytest.approx(2 / 6, abs=1e-7)  # ratios of small integers, fp32 mean
    assert res["text_to_image_R@5"] == res["text_to_image_R@10"] == 1.0
    # i2t, by cosine of each image with each caption:
    #   img0: a 1.0 (own)                                 -> hit @1
    #   img1: c 1.0 (own), g 0.8, b 0.994                 -> hit @1
    #   img2: f 0.919 (img1's), g 0.6 (own), d 0.243 (img0's) -> its best own caption is 2nd: miss @1, hit @5
    assert res["image_to_text_R@1"] == pytest.approx(2 / 3, abs=1e-7)
    assert res["image_to_text_R@5"] == 1.0
    assert (res["num_images"], res["num_texts"], res["num_skipped"]) == (3, 6, 0)
    assert res["mean_recall"] == pytest.approx((2 / 6 + 1 + 1 + 2 / 3 + 1 + 1) / 6, abs=1e-7)


def _clip_benchmark_recall(scores: torch.Tensor, positive: torch.Tensor, k: int) -> float:
    """CLIP_benchmark's definition, written out: per query, topk candidates, hit if any of them is positive."""
    top = scores.topk(min(k, scores.shape[1]), dim=1).indices
    return positive.gather(1, top).any(dim=1).float().mean().item()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recall_matches_a_direct_computation_from_embeddings(tmp_path, seed):
    rng = np.random.default_rng(seed)
    num_images, dim = 23, 6
    images = rng.normal(size=(num_images, dim)) * rng.uniform(0.3, 3.0, size=(num_images, 1))
    captions, vecs = [], {}
    for i in range(num_images):
        caps = []
        for j in range(int(rng.integers(1, 6))):  # 1-5 captions per image, as in COCO / Flickr30k
            name = f"img{i} cap{j}"
            # Near the image's own direction plus noise, so recall is neither 0 nor 1.
            vecs[name] = images[i] / np.linalg.norm(images[i]) + rng.normal(size=dim) * 0.9
            caps.append(name)
        captions.append(caps)
    model, tok = _table_case(tmp_path, images, captions, vecs)
    res = retrieval.evaluate(model, id_preprocess, tok, tmp_path, batch_size=5)
    img = torch.tensor(images / np.linalg.norm(images, axis=1, keepdims=True), dtype=torch.float32)
    texts = [c for caps in captions for c in caps]
    txt = torch.tensor(np.stack([vecs[t] / np.linalg.norm(vecs[t]) for t in texts]), dtype=torch.float32)
    owner = torch.tensor([i for i, caps in enumerate(captions) for _ in caps])
    scores = txt @ img.T  # (T, I)
    positive = torch.zeros_like(scores, dtype=torch.bool)
    positive[torch.arange(len(texts)), owner] = True
    # Random real-valued features: ties have probability zero, so topk's arbitrary tie order cannot matter.
    for k in (1, 5, 10):
        assert res[f"text_to_image_R@{k}"] == pytest.approx(_clip_benchmark_recall(scores, positive, k), abs=1e-6)
        assert res[f"image_to_text_R@{k}"] == pytest.approx(_clip_benchmark_recall(scores.T, positive.T, k),
                                                            abs=1e-6)
    values = [res[f"{d}_R@{k}"] for d in ("text_to_image", "image_to_text") for k in (1, 5, 10)]
    assert 0 < min(values) and max(values[:1] + values[3:4]) < 1  # the case can tell a wrong rule apart


def test_ties_count_against_the_model(tmp_path):
    # Constant features: every candidate ties. A topk-based count would give an arbitrary recall; here no query
    # finds its positive strictly ahead of three tied negatives, so R@1 is 0 and R@5 (> 4 candidates) is 1.
    images = np.ones((4, 3))
    captions = [[f"t{i}"] for i in range(4)]
    model, tok = _table_case(tmp_path, images, captions, {f"t{i}": np.ones(3) for i in range(4)})
    res = retrieval.evaluate(model, id_preprocess, tok, tmp_path)
    assert res["text_to_image_R@1"] == res["image_to_text_R@1"] == 0.0
    assert res["text_to_image_R@5"] == 1.0


def test_recall_at_k_rejects_bad_shapes():
    with pytest.raises(ValueError, match="at least one positive"):
        retrieval.recall_at_k(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="equal 2-D"):
        retrieval.recall_at_k(torch.zeros(2, 3), torch.ones(3, 2, dtype=torch.bool))


def test_skips_unreadable_images_images_without_captions_and_damaged_shards(tmp_path):
    e = np.eye(4)
    samples = [("s0000000", {"png": _png(0), "txt": b"t0"}), ("s0000001", {"png": _png(1), "txt": b"t1"}),
               ("s0000002", {"webp": b"not an image", "txt": b"t2"}), ("s0000003", {"png": _png(3), "txt": b""}),
               ("s0000004", {"png": _png(2), "txt": b"t2b"}), ("s0000005", {"png": _png(1), "txt": b"x"})]
    write_retrieval_set(tmp_path, samples, per_shard=2)
    shard = tmp_path / "test" / "2.tar"
    # Members are 512-byte headers plus data padded to 512: s4.png, s4.txt end at 2048; cut inside s5.png.
    shard.write_bytes(shard.read_bytes()[:2048 + 600])
    vecs = {"t0": e[0], "t1": e[1], "t2": e[2], "t2b": e[2], "x": e[3]}
    model = TableModel(np.stack([e[0], e[1], e[2], e[3]]), np.stack(list(vecs.values())))
    tok = TableTokenizer(list(vecs))
    with pytest.raises(ValueError, match=r"1 of \d images missing or unreadable"):
        retrieval.evaluate(model, id_preprocess, tok, tmp_path)
    res = retrieval.evaluate(model, id_preprocess, tok, tmp_path, strict=False)
    assert res["num_damaged_shards"] == 1 and res["num_skipped"] == 1
    assert res["num_images_without_captions"] == 1  # s0000003: an empty .txt
    assert res["num_texts"] == 3  # t0, t1, t2b
    assert res["text_to_image_R@1"] == 1.0 and res["image_to_text_R@1"] == 1.0
    assert any("damaged shard" in n for n in res["notes"])


def test_wrong_kind_of_directory_is_one_line_each_way(tmp_path):
    model, tok = TableModel(np.eye(2), np.eye(2)), TableTokenizer(["a", "b"])
    write_retrieval_set(tmp_path / "r", [("s0000000", {"png": _png(0), "txt": b"a"})])
    with pytest.raises(ValueError, match=r"is not a zero-shot classification set.*retrieval set.*--retrieval"):
        zeroshot.evaluate(model, id_preprocess, tok, tmp_path / "r")
    (tmp_path / "z").mkdir()
    (tmp_path / "z" / "classnames.txt").write_text("a\nb\n")
    with pytest.raises(ValueError, match=r"is not a retrieval set.*zero-shot classification set.*--zeroshot"):
        retrieval.evaluate(model, id_preprocess, tok, tmp_path / "z")
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "swap_att.json").write_text("{}")
    with pytest.raises(ValueError, match=r"is not a retrieval set.*SugarCrepe"):
        retrieval.evaluate(model, id_preprocess, tok, tmp_path / "s")
    with pytest.raises(ValueError, match="not found"):
        retrieval.evaluate(model, id_preprocess, tok, tmp_path / "nowhere")


def test_empty_set_is_an_error(tmp_path):
    write_retrieval_set(tmp_path, [("s0000000", {"txt": b"caption without image"})])
    model, tok = TableModel(np.eye(2), np.eye(2)), TableTokenizer(["caption without image"])
    with pytest.raises(ValueError, match="no usable image with a caption"):
        retrieval.evaluate(model, id_preprocess, tok, tmp_path, strict=False)


# ------------------------------------------------------------------------------------ synthetic world, open_clip

def test_synthetic_world_retrieval_matches_clip_benchmark_procedure(tiny_clip, small_world):
    import webdataset as wds
    model, preprocess, tokenizer = tiny_clip
    root = Path(small_world.retrieval_dir)
    assert (root / "dataset_type.txt").read_text().strip() == "retrieval"
    nshards = int((root / "test" / "nshards.txt").read_text())
    # Read it the way CLIP_benchmark's build_wds_dataset does for a retrieval set.
    ds = wds.WebDataset(str(root / "test" / f"{{0..{nshards - 1}}}.tar"), shardshuffle=False,
                        nodesplitter=lambda src: src).decode("pil").to_tuple("webp", "txt")
    with torch.no_grad():
        img_feats, txt_feats, owner = [], [], []
        for i, (img, txt) in enumerate(ds):
            caps = txt.splitlines()
            assert 3 <= len(caps) <= 5
            img_feats.append(model.encode_image(preprocess(img).unsqueeze(0), normalize=True))
            txt_feats.append(model.encode_text(tokenizer(caps), normalize=True))
            owner += [i] * len(caps)
    img, txt = torch.cat(img_feats), torch.cat(txt_feats)
    scores = txt @ img.T
    positive = torch.zeros_like(scores, dtype=torch.bool)
    positive[torch.arange(len(owner)), torch.tensor(owner)] = True
    res = retrieval.evaluate(model, preprocess, tokenizer, root, batch_size=7)
    assert res["num_images"] == img.shape[0] and res["num_texts"] == len(owner)
    for k in (1, 5, 10):
        # Batched vs single fp32 encodes differ by ~1e-6 in a cosine; a near-tie could flip one query, so allow
        # one query's worth of difference (1 / num_queries).
        assert res[f"text_to_image_R@{k}"] == pytest.approx(_clip_benchmark_recall(scores, positive, k),
                                                            abs=1.01 / len(owner))
        assert res[f"image_to_text_R@{k}"] == pytest.approx(_clip_benchmark_recall(scores.T, positive.T, k),
                                                            abs=1.01 / img.shape[0])


def test_cli_eval_retrieval_and_bad_input(tmp_path, small_world, capsys):
    out = tmp_path / "r.json"
    rc = cli_main(["eval", "--model", "clove-micro", "--device", "cpu", "--retrieval", small_world.retrieval_dir,
                   "--out", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())["retrieval"]
    assert set(res) >= {"text_to_image_R@1", "image_to_text_R@10", "num_images"}
    capsys.readouterr()
    rc = cli_main(["eval", "--model", "clove-micro", "--device", "cpu", "--retrieval", small_world.zeroshot_dir])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0
    assert small_world.zeroshot_dir in err and "not a retrieval set" in err and "zero-shot" in err
    rc = cli_main(["eval", "--model", "clove-micro", "--device", "cpu", "--zeroshot", small_world.retrieval_dir])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and "retrieval set" in err and "classnames.txt" in err
