"""SugarCrepe and zero-shot evaluators against computations written here.

Two kinds of model: a table model whose image and text features are chosen by the test (so every accuracy,
including the strictly-higher tie rule, is known exactly), and a tiny real open_clip CLIP on a synthetic world,
checked against the official one-example-at-a-time procedure.
"""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import webdataset as wds
from PIL import Image

from clove_dist.data.synthetic import write_world
from clove_dist.eval import evaluate_all, sugarcrepe, zeroshot

SUBSETS = ["replace_obj", "replace_att", "replace_rel", "swap_obj", "swap_att", "add_obj", "add_att"]


# ------------------------------------------------------------------------------------------------ table model

class TableModel(torch.nn.Module):
    """encode_image reads an id from the preprocessed image; encode_text looks up a token id. Counts images."""

    def __init__(self, image_table: np.ndarray, text_table: np.ndarray):
        super().__init__()
        self.register_buffer("image_table", torch.tensor(image_table, dtype=torch.float32))
        self.register_buffer("text_table", torch.tensor(text_table, dtype=torch.float32))
        self.num_images_encoded = 0

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, 1) ids as floats
        self.num_images_encoded += x.shape[0]
        return self.image_table[x[:, 0].round().long()]

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:  # tokens: (N, 1)
        return self.text_table[tokens[:, 0]]


def id_preprocess(img: Image.Image) -> torch.Tensor:
    return torch.tensor([float(img.getpixel((0, 0))[0])])  # the id is the red value of a lossless PNG


class TableTokenizer:
    def __init__(self, texts: list[str]):
        self.index = {t: i for i, t in enumerate(texts)}

    def __call__(self, texts: list[str]) -> torch.Tensor:
        return torch.tensor([[self.index[t]] for t in texts])


def _save_id_png(path: Path, i: int) -> None:
    Image.new("RGB", (4, 4), (i, 0, 0)).save(path, format="PNG")


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.fixture
def table_sugarcrepe(tmp_path):
    """A SugarCrepe directory over 9 images (shared across subsets) with chosen feature vectors.

    Returns (directory, model, tokenizer, expected {subset: [correct per example, in file order]}).
    """
    rng = np.random.default_rng(0)
    num_images, dim = 9, 5
    images = rng.normal(size=(num_images, dim)) * rng.uniform(0.2, 5.0, size=(num_images, 1))
    axis, other = np.eye(dim)[0], np.eye(dim)[1]
    images[0] = 3.0 * axis  # image 0 is kept for the hand-made cases below
    texts, vectors = [], []

    def text(vec) -> str:
        texts.append(f"text {len(texts)}")
        vectors.append(np.asarray(vec, dtype=np.float64))
        return texts[-1]

    (tmp_path / "images").mkdir()
    for i in range(num_images):
        _save_id_png(tmp_path / "images" / f"{i:012d}.jpg", i)  # PNG bytes under the real benchmark's names
    expected: dict[str, list[bool]] = {}
    for s, subset in enumerate(SUBSETS):
        entries, correct = {}, []
        for e in range(4 + s % 3):  # subsets of different sizes, so the overall mean is not a mean of groups
            img = 1 + (s + 2 * e) % (num_images - 1)
            while True:  # random texts, redrawn until not within 1e-3 of a tie (fp32 cannot flip those)
                pos_vec = rng.normal(size=dim) * rng.uniform(0.1, 10.0)
                neg_vec = rng.normal(size=dim) * rng.uniform(0.1, 10.0)
                if abs(_cos(images[img], pos_vec) - _cos(images[img], neg_vec)) > 1e-3:
                    break
            entries[str(e)] = {"filename": f"{img:012d}.jpg", "caption": text(pos_vec),
                               "negative_caption": text(neg_vec)}
            correct.append(_cos(images[img], pos_vec) > _cos(images[img], neg_vec))
        if subset == "replace_att":
            # An exact tie (two texts, one vector) is wrong; a negative with a larger dot product but a smaller
            # cosine is right (normalisation matters); and the mirror image of that is wrong.
            tie = rng.normal(size=dim)
            big = 10 * axis + 12 * other
            for pos, neg, ok in [(text(tie), text(tie), False), (text(0.5 * axis), text(big), True),
                                 (text(big), text(0.5 * axis), False)]:
                entries[str(len(entries))] = {"filename": f"{0:012d}.jpg", "caption": pos, "negative_caption": neg}
                correct.append(ok)
        expected[subset] = correct
        (tmp_path / f"{subset}.json").write_text(json.dumps(entries, indent=4))
    model = TableModel(images, np.stack(vectors))
    return tmp_path, model, TableTokenizer(texts), expected


def _expected_metrics(expected: dict[str, list[bool]]) -> dict[str, float]:
    acc = {s: sum(v) / len(v) for s, v in expected.items()}
    groups = {"replace": ["replace_obj", "replace_att", "replace_rel"], "swap": ["swap_obj", "swap_att"],
              "add": ["add_obj", "add_att"]}
    out = dict(acc)
    for g, members in groups.items():
        present = [acc[m] for m in members if m in acc]
        out[g] = sum(present) / len(present)
    out["average"] = sum(acc.values()) / len(acc)
    return out


# ------------------------------------------------------------------------------------------ sugarcrepe, table

def test_sugarcrepe_accuracy_matches_the_strict_rule(table_sugarcrepe):
    root, model, tokenizer, expected = table_sugarcrepe
    model.train()
    res = sugarcrepe.evaluate(model, id_preprocess, tokenizer, root, batch_size=3)
    want = _expected_metrics(expected)
    for key, value in want.items():
        # Accuracies are ratios of small integers; 1e-12 only absorbs float division order.
        assert res[key] == pytest.approx(value, abs=1e-12), key
    for subset in SUBSETS:
        c = res["counts"][subset]
        assert c["num_correct"] == sum(expected[subset])
        assert c["num_evaluated"] == c["num_examples"] == len(expected[subset])
    assert res["replace_att"] < 1.0 and res["missing_subsets"] == [] and res["notes"] == []
    # Every unique image encoded once, though subsets share them.
    used = {v["filename"] for s in SUBSETS for v in json.loads((root / f"{s}.json").read_text()).values()}
    assert model.num_images_encoded == len(used) < sum(len(v) for v in expected.values())
    assert model.training, "the evaluator must restore the model's training mode"


def test_sugarcrepe_skips_missing_images_malformed_entries_and_subsets(table_sugarcrepe, tmp_path):
    root, model, tokenizer, expected = table_sugarcrepe
    for subset in ("swap_obj", "add_obj"):
        (root / f"{subset}.json").unlink()
        expected.pop(subset)
    data = json.loads((root / "swap_att.json").read_text())
    data["900"] = {"filename": "not_there.jpg", "caption": "x", "negative_caption": "y"}
    data["901"] = {"filename": f"{1:012d}.jpg", "caption": "only a caption"}
    data["902"] = "not an entry"
    (root / "swap_att.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"1 of 10 images missing or unreadable .*--no-strict"):
        sugarcrepe.evaluate(model, id_preprocess, tokenizer, root, batch_size=4)
    res = sugarcrepe.evaluate(model, id_preprocess, tokenizer, root, batch_size=4, strict=False)
    assert res["missing_subsets"] == ["swap_obj", "add_obj"]
    assert "swap_obj" not in res and "add_obj" not in res
    want = _expected_metrics(expected)
    for key, value in want.items():
        assert res[key] == pytest.approx(value, abs=1e-12), key  # ratios of small integers, as above
    assert res["swap"] == res["swap_att"] and res["add"] == res["add_att"]
    c = res["counts"]["swap_att"]
    assert (c["num_missing_images"], c["num_malformed"]) == (1, 2)
    assert c["num_examples"] == len(expected["swap_att"]) + 3 and c["num_evaluated"] == len(expected["swap_att"])
    notes = " ".join(res["notes"])
    assert "swap_obj" in notes and "add_obj" in notes and "missing" in notes and "malformed" in notes


def test_sugarcrepe_reads_early_release_names_and_a_separate_image_dir(table_sugarcrepe):
    root, model, tokenizer, expected = table_sugarcrepe
    (root / "replace_obj.json").rename(root / "replace_ent.json")
    (root / "images").rename(root / "val2017")
    res = sugarcrepe.evaluate(model, id_preprocess, tokenizer, root, image_dir=root / "val2017")
    assert res["replace_obj"] == pytest.approx(sum(expected["replace_obj"]) / len(expected["replace_obj"]),
                                               abs=1e-12)  # a ratio of small integers
    with pytest.raises(ValueError, match="image directory"):
        sugarcrepe.evaluate(model, id_preprocess, tokenizer, root)


def test_sugarcrepe_user_errors(tmp_path):
    model, tok = TableModel(np.eye(2), np.eye(2)), TableTokenizer(["a", "b"])
    with pytest.raises(ValueError, match=str(tmp_path / "nowhere")):
        sugarcrepe.evaluate(model, id_preprocess, tok, tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=f"no SugarCrepe subset file .* in {tmp_path / 'empty'}"):
        sugarcrepe.evaluate(model, id_preprocess, tok, tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "swap_att.json").write_text("[1, 2")
    with pytest.raises(ValueError, match="swap_att.json is not valid JSON"):
        sugarcrepe.evaluate(model, id_preprocess, tok, tmp_path / "bad")
    (tmp_path / "bad" / "swap_att.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="must hold a JSON object"):
        sugarcrepe.evaluate(model, id_preprocess, tok, tmp_path / "bad")
    with pytest.raises(ValueError, match="batch_size"):
        sugarcrepe.evaluate(model, id_preprocess, tok, tmp_path / "bad", batch_size=0)


# -------------------------------------------------------------------------------------------- zeroshot, table

def _write_clip_benchmark(root: Path, classnames: list[str], templates: list[str] | None,
                          samples: list[tuple[str, dict[str, bytes]]], per_shard: int) -> None:
    (root / "test").mkdir(parents=True)
    (root / "classnames.txt").write_text("\n".join(classnames) + "\n")
    if templates is not None:
        (root / "zeroshot_classification_templates.txt").write_text("\n".join(templates) + "\n")
    shards = [samples[i:i + per_shard] for i in range(0, len(samples), per_shard)]
    for n, shard in enumerate(shards):
        with tarfile.open(root / "test" / f"{n}.tar", "w") as tar:
            for key, files in shard:
                for ext, data in files.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    (root / "test" / "nshards.txt").write_text(f"{len(shards)}\n")


def _png_bytes(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (i, 0, 0)).save(buf, format="PNG")
    return buf.getvalue()


def _zeroshot_case(tmp_path: Path, num_classes: int, templates: list[str] | None, num_images: int = 40, seed=0):
    rng = np.random.default_rng(seed)
    dim = 6
    classnames = [f"class{c}" for c in range(num_classes)]
    used_templates = templates if templates is not None else ["a photo of a {c}."]
    texts = [t.replace("{c}", c) for c in classnames for t in used_templates]
    # Template vectors of very different norms: the mean of raw vectors would follow the longest one.
    text_vecs = rng.normal(size=(len(texts), dim)) * rng.uniform(0.05, 20.0, size=(len(texts), 1))
    image_vecs = rng.normal(size=(num_images, dim)) * rng.uniform(0.2, 5.0, size=(num_images, 1))
    labels = rng.integers(0, num_classes, size=num_images)
    samples = [(f"s{i:07d}", {"png": _png_bytes(i), "cls": str(int(labels[i])).encode()})
               for i in range(num_images)]
    _write_clip_benchmark(tmp_path, classnames, templates, samples, per_shard=15)
    # The classifier as CLIP builds it: normalise each template embedding, average, normalise.
    t = text_vecs / np.linalg.norm(text_vecs, axis=1, keepdims=True)
    w = t.reshape(num_classes, len(used_templates), dim).mean(1)
    w /= np.linalg.norm(w, axis=1, keepdims=True)
    sims = (image_vecs / np.linalg.norm(image_vecs, axis=1, keepdims=True)) @ w.T  # (N, C)
    model = TableModel(image_vecs, text_vecs)
    return model, TableTokenizer(texts), classnames, labels, sims, text_vecs


def test_zeroshot_matches_clip_classifier(tmp_path):
    model, tok, classnames, labels, sims, text_vecs = _zeroshot_case(tmp_path, 7, ["a {c}.", "the {c}!", "{c}"])
    order = np.argsort(-sims, axis=1)
    top1 = (order[:, 0] == labels).mean()
    top5 = np.mean([labels[i] in order[i, :5] for i in range(len(labels))])
    # The test can tell a wrong classifier apart: averaging raw template vectors predicts differently.
    raw = text_vecs.reshape(7, 3, -1).mean(1)
    assert (np.argmax(sims, 1) != np.argmax(model.image_table.numpy() @ raw.T, 1)).any()
    res = zeroshot.evaluate(model, id_preprocess, tok, tmp_path, batch_size=4)
    # Accuracies are ratios of integers over 40 images; 1e-6 covers the fp32 mean in the evaluator.
    assert res["top1"] == pytest.approx(top1, abs=1e-6)
    assert res["top5"] == pytest.approx(top5, abs=1e-6)
    per_class = {c: float((order[labels == k, 0] == k).mean()) if (labels == k).any() else None
                 for k, c in enumerate(classnames)}
    for name, value in per_class.items():
        assert res["per_class"][name] == (None if value is None else pytest.approx(value, abs=1e-6))
    present = [v for v in per_class.values() if v is not None]
    assert res["mean_per_class_recall"] == pytest.approx(sum(present) / len(present), abs=1e-6)
    assert (res["num_classes"], res["num_templates"], res["num_examples"], res["num_skipped"]) == (7, 3, 40, 0)
    assert 0 < res["top1"] < res["top5"] < 1


def test_zeroshot_known_top1_and_no_top5_below_five_classes(tmp_path):
    # Each image's feature is its own class's mean template direction: top-1 must be exactly 1.
    classnames = ["red circle", "blue square", "green cross"]
    templates = ["a photo of a {c}.", "a {c}."]
    texts = [t.replace("{c}", c) for c in classnames for t in templates]
    text_vecs = np.array([[1, 0, 0, 0], [3, 1, 0, 0], [0, 2, 0, 0], [0, 5, 1, 0], [0, 0, 1, 1], [0, 0, 7, 0]],
                         dtype=np.float64)
    t = text_vecs / np.linalg.norm(text_vecs, axis=1, keepdims=True)
    means = t.reshape(3, 2, 4).mean(1)
    labels = [0, 1, 2, 2, 1, 0, 0]
    samples = [(f"s{i:07d}", {"png": _png_bytes(i), "cls": str(l).encode()}) for i, l in enumerate(labels)]
    samples.append(("s0000100", {"png": _png_bytes(0), "cls": b"3"}))  # label out of range: skipped
    samples.append(("s0000101", {"cls": b"1"}))  # no image: skipped
    samples.append(("s0000102", {"webp": b"not an image", "cls": b"1"}))  # unreadable: skipped
    _write_clip_benchmark(tmp_path, classnames, templates, samples, per_shard=4)
    model = TableModel(means[labels], text_vecs)
    with pytest.raises(ValueError, match=r"3 of 10 images missing or unreadable"):
        zeroshot.evaluate(model, id_preprocess, TableTokenizer(texts), tmp_path, batch_size=2)
    res = zeroshot.evaluate(model, id_preprocess, TableTokenizer(texts), tmp_path, batch_size=2,
                            max_missing_share=0.3)  # 3 of 10 is not more than 30%
    assert res["top1"] == 1.0 and "top5" not in res
    assert res["per_class"] == {c: 1.0 for c in classnames}
    assert (res["num_examples"], res["num_skipped"]) == (7, 3) and "3 sample(s) skipped" in res["notes"][0]


def test_zeroshot_user_errors(tmp_path):
    model = TableModel(np.eye(2), np.eye(2))

    def tok(texts: list[str]) -> torch.Tensor:
        return torch.zeros(len(texts), 1, dtype=torch.long)
    with pytest.raises(ValueError, match="not found"):
        zeroshot.evaluate(model, id_preprocess, tok, tmp_path / "nowhere")
    (tmp_path / "a").mkdir()
    with pytest.raises(ValueError, match="not a zero-shot classification set .* not an evaluation set"):
        zeroshot.evaluate(model, id_preprocess, tok, tmp_path / "a")
    _write_clip_benchmark(tmp_path / "b", ["x", "y"], ["a photo"], [("s0000000", {"cls": b"0"})], 5)
    with pytest.raises(ValueError, match=r"template 'a photo' .* has no \{c\}"):
        zeroshot.evaluate(model, id_preprocess, tok, tmp_path / "b")
    (tmp_path / "b" / "zeroshot_classification_templates.txt").unlink()
    with pytest.raises(ValueError, match="split directory not found"):
        zeroshot.evaluate(model, id_preprocess, tok, tmp_path / "b", split="train")
    (tmp_path / "b" / "test" / "nshards.txt").write_text("3\n")
    with pytest.raises(ValueError, match="1.tar does not exist"):
        zeroshot.evaluate(model, id_preprocess, tok, tmp_path / "b")
    (tmp_path / "b" / "test" / "nshards.txt").write_text("1\n")
    shard = tmp_path / "b" / "test" / "0.tar"
    shard.write_bytes(b"\x00not a tar" * 100)
    with pytest.raises(ValueError, match=r"no usable sample .* 1 damaged shard"):
        zeroshot.evaluate(model, id_preprocess, tok, tmp_path / "b")


def test_zeroshot_without_templates_or_nshards_uses_defaults(tmp_path):
    model, tok, _, labels, sims, _ = _zeroshot_case(tmp_path, 5, None, num_images=20, seed=1)
    (tmp_path / "test" / "nshards.txt").unlink()
    res = zeroshot.evaluate(model, id_preprocess, tok, tmp_path)
    assert res["num_templates"] == 1 and "a photo of a {c}." in res["notes"][0]
    assert res["num_examples"] == 20  # both shards found without nshards.txt
    assert res["top1"] == pytest.approx((np.argmax(sims, 1) == labels).mean(), abs=1e-6)  # 20 images, fp32


# ------------------------------------------------------------------------------------- real open_clip model

@pytest.fixture(scope="module")
def tiny_clip():
    torch.manual_seed(0)
    model = open_clip.CLIP(embed_dim=32, vision_cfg=dict(image_size=64, layers=2, width=64, patch_size=16,
                                                         head_width=32),
                           text_cfg=dict(context_length=32, vocab_size=49408, width=64, heads=2, layers=2))
    # 32 tokens: the longest world caption is 14 words plus start and end tokens.
    tokenizer = open_clip.get_tokenizer("ViT-B-32", context_length=32)
    return model.eval(), open_clip.image_transform(64, is_train=False), tokenizer


@pytest.fixture(scope="module")
def small_world(tmp_path_factory):
    return write_world(tmp_path_factory.mktemp("evalworld"), seed=1, num_train=1, samples_per_shard=20,
                       num_eval_per_subset=6, num_zeroshot_per_class=2, image_size=64, num_retrieval_images=30,
                       num_aro_per_subset=8, progress=False)


def test_sugarcrepe_on_open_clip_matches_the_official_loop(tiny_clip, small_world):
    model, preprocess, tokenizer = tiny_clip
    res = sugarcrepe.evaluate(model, preprocess, tokenizer, small_world.sugarcrepe_dir, batch_size=7,
                              return_scores=True)
    root = Path(small_world.sugarcrepe_dir)
    total_correct = total = 0
    with torch.no_grad():
        for subset in SUBSETS:
            entries = json.loads((root / f"{subset}.json").read_text()).values()
            got = res["scores"][subset]
            correct = 0
            for e, pos_got, neg_got in zip(entries, got["positive"], got["negative"]):
                # The official procedure: one image, one caption, one negative per forward pass.
                image = preprocess(Image.open(root / "images" / e["filename"])).unsqueeze(0)
                img = model.encode_image(image, normalize=True)
                pos = (model.encode_text(tokenizer([e["caption"]]), normalize=True) @ img.T).item()
                neg = (model.encode_text(tokenizer([e["negative_caption"]]), normalize=True) @ img.T).item()
                # 1e-5: batched and single fp32 matmuls sum in different orders; cosines are O(1) with 32 dims.
                assert pos_got == pytest.approx(pos, abs=1e-5) and neg_got == pytest.approx(neg, abs=1e-5)
                assert abs(pos - neg) > 1e-5, "a near tie would make this comparison order-dependent"
                correct += pos > neg
            assert res["counts"][subset]["num_correct"] == correct
            assert res[subset] == correct / len(entries)
            total_correct, total = total_correct + correct, total + len(entries)
    assert res["average"] == pytest.approx(total_correct / total, abs=1e-12)  # equal-size subsets: a plain ratio


def test_zeroshot_on_open_clip_matches_clip_benchmark_procedure(tiny_clip, small_world):
    model, preprocess, tokenizer = tiny_clip
    root = Path(small_world.zeroshot_dir)
    classnames = (root / "classnames.txt").read_text().splitlines()
    templates = (root / "zeroshot_classification_templates.txt").read_text().splitlines()
    with torch.no_grad():
        weights = []
        for c in classnames:
            emb = model.encode_text(tokenizer([t.format(c=c) for t in templates]), normalize=True).mean(0)
            weights.append(emb / emb.norm())
        weights = torch.stack(weights, dim=1)  # (D, C)
        nshards = int((root / "test" / "nshards.txt").read_text())
        ds = wds.WebDataset(str(root / "test" / f"{{0..{nshards - 1}}}.tar"), shardshuffle=False,
                            nodesplitter=lambda src: src).decode("pil").to_tuple("webp", "cls")
        logits, labels = [], []
        for img, label in ds:
            logits.append(model.encode_image(preprocess(img).unsqueeze(0), normalize=True) @ weights)
            labels.append(label)
    logits, labels = torch.cat(logits), torch.tensor(labels)
    top2 = logits.topk(2, dim=1).values
    # 1e-5 as above; a near-tie between the top two classes could legitimately flip.
    assert (top2[:, 0] - top2[:, 1]).min() > 1e-5
    res = zeroshot.evaluate(model, preprocess, tokenizer, root, batch_size=9)
    assert res["top1"] == pytest.approx((logits.argmax(1) == labels).float().mean().item(), abs=1e-6)
    top5 = (logits.topk(5, dim=1).indices == labels[:, None]).any(1).float().mean().item()
    assert res["top5"] == pytest.approx(top5, abs=1e-6)  # a ratio of integers over 48 images, fp32 mean
    assert res["num_examples"] == len(labels) == 2 * len(classnames)


def test_evaluate_all_combines_both(tiny_clip, small_world):
    model, preprocess, tokenizer = tiny_clip
    both = evaluate_all(model, preprocess, tokenizer, sugarcrepe_dir=small_world.sugarcrepe_dir,
                        zeroshot_dir=small_world.zeroshot_dir, batch_size=16)
    assert set(both) == {"sugarcrepe", "zeroshot"}
    alone = sugarcrepe.evaluate(model, preprocess, tokenizer, small_world.sugarcrepe_dir, batch_size=16)
    assert both["sugarcrepe"] == alone
    assert evaluate_all(model, preprocess, tokenizer, zeroshot_dir=small_world.zeroshot_dir).keys() == {"zeroshot"}
    assert evaluate_all(model, preprocess, tokenizer) == {}
