"""The synthetic world: formats readable by their real readers, captions true of the pixels, negatives false.

The checks here do not trust the generator's own bookkeeping: captions are parsed by a small grammar written
in this file, and colours, positions, sizes and shapes are measured from the decoded pixels.
"""
from __future__ import annotations

import io
import json
import re
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from clove_dist.data import synthetic
from clove_dist.data.synthetic import WorldPaths, main, write_sugarcrepe, write_world

# The world's vocabulary as a reader of its captions knows it (not imported, so a change there is caught here).
PALETTE = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 70, 230), "yellow": (240, 220, 30),
           "purple": (150, 40, 190), "orange": (250, 130, 20)}
SHAPES = ("circle", "square", "triangle", "cross")
# The pre-training shards and the zero-shot set use a broader vocabulary than fine-tuning.
PRETRAIN_PALETTE = {**PALETTE, "pink": (250, 150, 200), "brown": (130, 75, 25), "cyan": (30, 210, 220),
                    "white": (245, 245, 245)}
PRETRAIN_SHAPES = (*SHAPES, "diamond", "ring")
# Compositions no training image shows, on which the SugarCrepe-format set is built (mirrors included).
HELD_OUT_PAIRS = {("red", "circle"), ("green", "square"), ("blue", "triangle"), ("yellow", "cross")}
_MIRROR = {"to the left of": "to the right of", "to the right of": "to the left of", "above": "below",
           "below": "above"}
HELD_OUT_TRIPLES = {("circle", "above", "square"), ("triangle", "to the left of", "cross"),
                    ("square", "to the left of", "triangle"), ("cross", "above", "circle")}
HELD_OUT_TRIPLES |= {(b, _MIRROR[r], a) for a, r, b in HELD_OUT_TRIPLES}
SIZES = ("small", "large")
RELATIONS = ("to the left of", "to the right of", "above", "below")
# SugarCrepe's field names and subset files, as in RAIVNLab/sugar-crepe's data/*.json.
SUGARCREPE_FIELDS = {"filename", "caption", "negative_caption"}
SUGARCREPE_FILES = ["add_att.json", "add_obj.json", "replace_att.json", "replace_obj.json", "replace_rel.json",
                    "swap_att.json", "swap_obj.json"]

_NP = rf"an?(?: ({'|'.join(SIZES)}))?(?: ({'|'.join(PALETTE)}))? ({'|'.join(SHAPES)})"
_CAPTION = re.compile(rf"^{_NP}(?: ({'|'.join(RELATIONS)}) {_NP})?$")

NUM_TRAIN, PER_SHARD, NUM_EVAL, PER_CLASS = 150, 64, 12, 2
NUM_RETRIEVAL, NUM_ARO = 70, 12


def parse(text: str) -> tuple[list[tuple[str | None, str | None, str]], str]:
    """Caption -> ([(size, colour, shape) per noun phrase], relation or "")."""
    m = _CAPTION.match(text)
    assert m, f"caption outside the grammar: {text!r}"
    for article, word in re.findall(r"\b(an?) (\w+)", text):
        assert (article == "an") == (word[0] in "aeiou"), f"wrong article in {text!r}"  # "an orange cross"
    g = m.groups()
    nps = [(g[0], g[1], g[2])] + ([(g[4], g[5], g[6])] if g[3] else [])
    return nps, g[3] or ""


# ------------------------------------------------------------------------------------------- pixel measurements

def measure(img: Image.Image, shapes: tuple[str, ...] = SHAPES) -> dict[str, dict]:
    """Per palette colour present: pixel count, centre, bounding box and the best-matching shape of `shapes`."""
    a = np.asarray(img.convert("RGB"), dtype=np.float64)  # (H, W, 3)
    names = list(PRETRAIN_PALETTE)
    pal = np.array([PRETRAIN_PALETTE[n] for n in names], dtype=np.float64)  # (10, 3)
    dist = np.linalg.norm(a[:, :, None, :] - pal[None, None], axis=-1)  # (H, W, 10)
    # 45 (of 441 max): JPEG at quality 95 keeps flat colours within ~10; an edge pixel half-blended with the grey
    # background is >= 80 away from every palette colour, so it counts as background.
    near = dist.min(-1) < 45
    label = dist.argmin(-1)
    found = {}
    for i, name in enumerate(names):
        mask = near & (label == i)
        # 40 pixels: the smallest object (a 12 px triangle) has ~60 solid pixels, while JPEG ringing where two
        # colours meet leaves fewer than 30 stray ones.
        if mask.sum() < 40:
            continue
        ys, xs = np.nonzero(mask)
        x0, y0, w, h = xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
        crop = mask[y0:y0 + h, x0:x0 + w]
        v, u = np.meshgrid((np.arange(h) + 0.5) / h * 2 - 1, (np.arange(w) + 0.5) / w * 2 - 1, indexing="ij")
        templates = {"circle": u * u + v * v <= 1, "square": np.ones_like(crop),
                     "triangle": np.abs(u) <= (v + 1) / 2, "cross": (np.abs(u) <= 0.36) | (np.abs(v) <= 0.36),
                     "diamond": np.abs(u) + np.abs(v) <= 1,
                     # A ring's hole is background, so the crop holds only its band (inner radius 0.55).
                     "ring": (u * u + v * v <= 1) & (u * u + v * v >= 0.55 ** 2)}
        iou = {k: (t & crop).sum() / (t | crop).sum() for k, t in templates.items() if k in shapes}
        found[name] = {"count": int(mask.sum()), "cx": xs.mean() / a.shape[1], "cy": ys.mean() / a.shape[0],
                       "extent": max(w, h) / a.shape[0], "shape": max(iou, key=iou.get)}
    return found


def caption_true_of_pixels(text: str, found: dict[str, dict]) -> bool:
    """Whether a fully coloured caption is true of the measured image."""
    nps, relation = parse(text)
    if len(nps) != len(found):
        return False
    objs = []
    for size, colour, shape in nps:
        assert colour is not None, "pixel truth needs every colour named"
        if colour not in found:
            return False
        o = found[colour]
        # Extents: small objects span 0.20-0.24 of the side, large 0.36-0.42; 0.30 splits them.
        if o["shape"] != shape or (size is not None and (o["extent"] > 0.30) != (size == "large")):
            return False
        objs.append(o)
    if relation:
        dx, dy = objs[1]["cx"] - objs[0]["cx"], objs[1]["cy"] - objs[0]["cy"]
        if relation in ("to the left of", "to the right of"):
            return abs(dx) > abs(dy) and (dx > 0) == (relation == "to the left of")
        return abs(dy) > abs(dx) and (dy > 0) == (relation == "above")
    return True


def caption_true_of_scene(text: str, scene: dict) -> bool:
    """Whether a caption (attributes possibly left out) is true of a scene record from the world's metadata."""
    nps, relation = parse(text)
    objs = scene["objects"]
    if len(nps) != len(objs):
        return False
    for (size, colour, shape), o in zip(nps, objs):
        if shape != o["shape"] or (size and size != o["size"]) or (colour and colour != o["colour"]):
            return False
    if relation:
        dx, dy = objs[1]["cx"] - objs[0]["cx"], objs[1]["cy"] - objs[0]["cy"]
        if relation in ("to the left of", "to the right of"):
            return abs(dx) > abs(dy) and (dx > 0) == (relation == "to the left of")
        return abs(dy) > abs(dx) and (dy > 0) == (relation == "above")
    return True


# ------------------------------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def world(tmp_path_factory) -> WorldPaths:
    return write_world(tmp_path_factory.mktemp("world"), seed=0, num_train=NUM_TRAIN, samples_per_shard=PER_SHARD,
                       num_eval_per_subset=NUM_EVAL, num_zeroshot_per_class=PER_CLASS, image_size=64,
                       num_retrieval_images=NUM_RETRIEVAL, num_aro_per_subset=NUM_ARO, progress=False)


@pytest.fixture(scope="module")
def train_samples(world):
    ds = wds.WebDataset(world.train_pattern, shardshuffle=False).decode("pil")
    return list(ds)


def _all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# -------------------------------------------------------------------------------------------------------- train

def test_train_shards_in_img2dataset_layout(world, train_samples):
    root = Path(world.root)
    assert world.train_pattern == f"{root}/train/{{00000..00002}}.tar"
    assert sorted(p.name for p in (root / "train").glob("*.tar")) == ["00000.tar", "00001.tar", "00002.tar"]
    assert len(train_samples) == NUM_TRAIN == world.num_train
    keys = [s["__key__"] for s in train_samples]
    # img2dataset: key = shard * 10^4 + index in shard, 9 digits.
    expected = [f"{(i // PER_SHARD) * 10_000 + i % PER_SHARD:09d}" for i in range(NUM_TRAIN)]
    assert keys == expected
    for s in train_samples:
        assert set(s) >= {"jpg", "txt", "json"}
        assert s["jpg"].size == (64, 64) and s["jpg"].mode == "RGB"
        assert s["json"]["key"] == s["__key__"]
        assert s["json"]["status"] == "success"
        assert s["json"]["caption"] == s["txt"] and s["txt"].strip()
        assert s["json"]["top_caption"] != s["txt"]
    stats = json.loads((root / "train" / "00002_stats.json").read_text())
    assert stats["count"] == NUM_TRAIN - 2 * PER_SHARD


def test_train_captions_are_true_of_the_pixels(train_samples):
    num_objects, relations, omitted = set(), set(), 0
    for s in train_samples:
        clean = s["json"]["top_caption"]
        nps, relation = parse(clean)
        num_objects.add(len(nps))
        relations.add(relation)
        found = measure(s["jpg"])
        assert len(found) == len(nps), (s["__key__"], clean, list(found))
        if all(colour for _, colour, _ in nps):
            assert caption_true_of_pixels(clean, found), (s["__key__"], clean, found)
        else:
            omitted += 1
        assert caption_true_of_scene(clean, s["json"]["scene"])
        # The alt-text is noise around the caption: mostly its words, never its sentence.
        assert set(s["txt"].split()) & set(clean.split()) - {"a", "of", "the", "to"} or len(s["txt"].split()) <= 4
    assert num_objects == {1, 2}
    assert relations == {"", *RELATIONS}
    assert 0 < omitted < len(train_samples) // 2


@pytest.fixture(scope="module")
def pretrain_samples(world):
    ds = wds.WebDataset(world.pretrain_pattern, shardshuffle=False).decode("pil")
    return list(ds)


def test_pretrain_shards_are_broad_alt_text(world, pretrain_samples):
    root = Path(world.root)
    assert world.pretrain_pattern == f"{root}/pretrain/{{00000..00002}}.tar"
    assert len(pretrain_samples) == world.num_pretrain == NUM_TRAIN  # default: as many as fine-tuning
    colours, shapes, confused, num_objects = set(), set(), 0, 0
    for s in pretrain_samples:
        # Web data: the alt-text only, no captioner output.
        assert s["json"]["caption"] == s["txt"] and "top_caption" not in s["json"]
        found = measure(s["jpg"], PRETRAIN_SHAPES)
        objs = s["json"]["scene"]["objects"]
        assert sorted(found) == sorted(o["colour"] for o in objs), (s["__key__"], found, objs)
        for o in objs:
            confused += found[o["colour"]]["shape"] != o["shape"]
            num_objects += 1
            colours.add(o["colour"])
            shapes.add(o["shape"])
    # This crude template match takes about 1% of small (13 px) JPEG crosses for diamonds (their edges blur into
    # the background); a drawing of the wrong shape would miss far more often.
    assert confused <= 0.03 * num_objects, (confused, num_objects)
    # Colours and shapes the fine-tuning shards never show are in the pre-training data.
    assert colours - set(PALETTE) and shapes - set(SHAPES)
    assert colours <= set(PRETRAIN_PALETTE) and shapes <= set(PRETRAIN_SHAPES)


def _held_out(scene: dict) -> bool:
    objs = scene["objects"]
    if any((o["colour"], o["shape"]) in HELD_OUT_PAIRS for o in objs):
        return True
    return len(objs) == 2 and (objs[0]["shape"], scene["relation"], objs[1]["shape"]) in HELD_OUT_TRIPLES


def test_held_out_compositions_are_in_no_training_image_and_every_eval_image(world, train_samples,
                                                                              pretrain_samples):
    for s in train_samples + pretrain_samples:
        assert not _held_out(s["json"]["scene"]), s["json"]
    root = Path(world.sugarcrepe_dir)
    scenes = json.loads((root / "scenes.json").read_text())
    assert scenes and all(_held_out(sc) for sc in scenes.values())
    for name in SUGARCREPE_FILES:
        for entry in json.loads((root / name).read_text()).values():
            nps, relation = parse(entry["caption"])
            shown = {(c, s) for _, c, s in nps} & HELD_OUT_PAIRS
            triple = len(nps) == 2 and (nps[0][2], relation, nps[1][2]) in HELD_OUT_TRIPLES
            # A positive with an attribute left out (add_att) may name the held-out object without its colour.
            assert shown or triple or name == "add_att.json", entry


def test_no_eval_caption_occurs_in_any_training_shard(world, train_samples, pretrain_samples):
    seen = {s["txt"] for s in train_samples + pretrain_samples}
    seen |= {s["json"]["top_caption"] for s in train_samples}
    assert len(seen) > NUM_TRAIN  # both caption fields of both shard sets were read
    root = Path(world.sugarcrepe_dir)
    for name in SUGARCREPE_FILES:
        for entry in json.loads((root / name).read_text()).values():
            assert entry["caption"] not in seen and entry["negative_caption"] not in seen, (name, entry)


# --------------------------------------------------------------------------------------------------- sugarcrepe

def test_sugarcrepe_files_match_the_real_format(world):
    root = Path(world.sugarcrepe_dir)
    assert sorted(p.name for p in root.glob("*.json") if p.name != "scenes.json") == SUGARCREPE_FILES
    filenames = set()
    for name in SUGARCREPE_FILES:
        data = json.loads((root / name).read_text())
        assert isinstance(data, dict)
        assert list(data) == [str(i) for i in range(NUM_EVAL)]
        for entry in data.values():
            assert set(entry) == SUGARCREPE_FIELDS
            assert re.fullmatch(r"\d{12}\.jpg", entry["filename"])  # COCO val2017 style
            assert (root / "images" / entry["filename"]).is_file()
            assert entry["caption"].lower() != entry["negative_caption"].lower()
            filenames.add(entry["filename"])
    # Two pools of images shared across subsets, as COCO images are shared in the real benchmark.
    assert len(filenames) == 2 * NUM_EVAL


def _words(text: str) -> list[str]:
    return [w for w in text.split() if w not in ("a", "an")]  # "a red" -> "an orange" is one word changed


def test_sugarcrepe_positive_true_negative_false(world):
    check_true_and_false(Path(world.sugarcrepe_dir), SUGARCREPE_FILES)


def check_true_and_false(root: Path, files: list[str]) -> None:
    """Every positive of `files` under `root` is true of its scene and pixels, every negative false of its scene,
    and each negative differs from its positive the way its subset says."""
    scenes = json.loads((root / "scenes.json").read_text())
    for name in files:
        subset = name[:-5]
        for entry in json.loads((root / name).read_text()).values():
            pos, neg = entry["caption"], entry["negative_caption"]
            scene = scenes[entry["filename"]]
            assert caption_true_of_scene(pos, scene), (subset, pos, scene)
            assert not caption_true_of_scene(neg, scene), (subset, neg, scene)
            img = Image.open(root / "images" / entry["filename"])
            found = measure(img)
            if all(c for _, c, _ in parse(pos)[0]):
                assert caption_true_of_pixels(pos, found), (subset, pos, found)
            (pnps, prel), (nnps, nrel) = parse(pos), parse(neg)
            pw, nw = _words(pos), _words(neg)
            if subset == "replace_rel":
                assert pnps == nnps and prel != nrel
            elif subset in ("replace_obj", "replace_att"):
                assert prel == nrel and len(pw) == len(nw)
                diff = [(a, b) for a, b in zip(pw, nw) if a != b]
                assert len(diff) == 1
                kinds = [SHAPES] if subset == "replace_obj" else [tuple(PALETTE), SIZES]
                assert any(diff[0][0] in k and diff[0][1] in k for k in kinds), diff
            elif subset == "swap_obj":
                assert nnps == pnps[::-1] and nrel == prel
            elif subset == "swap_att":
                assert sorted(pw) == sorted(nw) and nrel == prel
                assert [s for _, _, s in nnps] == [s for _, _, s in pnps]  # shapes stay, attributes move
            elif subset == "add_obj":
                assert len(pnps) == 1 and len(nnps) == 2 and neg.startswith(pos + " ")
            elif subset == "add_att":
                assert len(nw) == len(pw) + 1 and prel == nrel
                added = list((Counter(nw) - Counter(pw)).elements())
                assert len(added) == 1 and added[0] in (*PALETTE, *SIZES)


def test_seen_composition_set_is_the_world_set_without_its_held_out_pairs(world, train_samples, pretrain_samples,
                                                                          tmp_path):
    """write_sugarcrepe(held_out=False): the same format and rules on compositions training shows, in captions it
    does not (benchmarks/bench_demo_probe.py sets it beside the world's held-out set)."""
    seen = {s["txt"] for s in train_samples + pretrain_samples} | {s["json"]["top_caption"] for s in train_samples}
    root = Path(write_sugarcrepe(tmp_path / "seen", 0, NUM_EVAL, 64, seen, held_out=False))
    files = [f for f in SUGARCREPE_FILES if f != "add_obj.json"]
    assert sorted(p.name for p in root.glob("*.json") if p.name != "scenes.json") == files
    scenes = json.loads((root / "scenes.json").read_text())
    assert len(scenes) == NUM_EVAL and not any(_held_out(sc) for sc in scenes.values())
    for name in files:
        entries = json.loads((root / name).read_text())
        assert list(entries) == [str(i) for i in range(NUM_EVAL)]
        for entry in entries.values():
            assert entry["caption"] not in seen and entry["negative_caption"] not in seen, (name, entry)
    check_true_and_false(root, files)
    world_scenes = json.loads((Path(world.sugarcrepe_dir) / "scenes.json").read_text())
    assert not set(map(json.dumps, scenes.values())) & set(map(json.dumps, world_scenes.values()))


class _EveryCaption(set):
    def __contains__(self, caption) -> bool:
        return True


def test_seen_composition_set_says_so_when_training_holds_every_caption(tmp_path):
    with pytest.raises(ValueError, match="hold nearly every caption"):
        write_sugarcrepe(tmp_path / "seen", 0, 1, 32, _EveryCaption(), held_out=False)


# ------------------------------------------------------------------------------------------------------ zeroshot

def test_zeroshot_in_clip_benchmark_layout(world):
    root = Path(world.zeroshot_dir)
    classes = (root / "classnames.txt").read_text().splitlines()
    # The pre-training classes, broader than the fine-tuning vocabulary, without the held-out pairs.
    assert classes == [f"{c} {s}" for c in PRETRAIN_PALETTE for s in PRETRAIN_SHAPES if (c, s) not in HELD_OUT_PAIRS]
    assert {c.split()[0] for c in classes} - set(PALETTE) and {c.split()[1] for c in classes} - set(SHAPES)
    templates = (root / "zeroshot_classification_templates.txt").read_text().splitlines()
    assert templates and all("{c}" in t for t in templates)
    nshards = int((root / "test" / "nshards.txt").read_text())
    assert sorted(p.name for p in (root / "test").glob("*.tar")) == sorted(f"{i}.tar" for i in range(nshards))
    # Read it the way CLIP_benchmark's build_wds_dataset does.
    ds = wds.WebDataset(str(root / "test" / f"{{0..{nshards - 1}}}.tar"), shardshuffle=False,
                        nodesplitter=lambda src: src).decode("pil").to_tuple("__key__", "webp", "cls")
    counts = [0] * len(classes)
    for key, img, label in ds:
        assert re.fullmatch(r"s\d{7}", key)
        colour, shape = classes[label].split()
        found = measure(img, PRETRAIN_SHAPES)
        assert list(found) == [colour] and found[colour]["shape"] == shape, (key, classes[label], found)
        counts[label] += 1
    assert counts == [PER_CLASS] * len(classes)


# ----------------------------------------------------------------------------------------------------- retrieval

def _true_paraphrase(text: str, found: dict[str, dict]) -> bool:
    """Whether one of the world's retrieval/order captions is true of the measured pixels."""
    text = text.removeprefix("there is ").removesuffix(".")
    if " and " in text:  # "a red circle and a blue square": both objects, colours bound to shapes, no relation
        parts = [p.split() for p in text.split(" and ")]
        return len(found) == 2 and all(len(p) == 3 and p[1] in found and found[p[1]]["shape"] == p[2]
                                       for p in parts)
    return caption_true_of_pixels(text, found)  # every other wording names both colours (sizes optional)


def test_retrieval_in_clip_benchmark_layout(world):
    root = Path(world.retrieval_dir)
    assert (root / "dataset_type.txt").read_text() == "retrieval\n"
    assert not (root / "classnames.txt").exists()
    nshards = int((root / "test" / "nshards.txt").read_text())
    assert nshards == -(-NUM_RETRIEVAL // PER_SHARD) == 2
    # Read it the way CLIP_benchmark's build_wds_dataset does for dataset_type "retrieval".
    ds = wds.WebDataset(str(root / "test" / f"{{0..{nshards - 1}}}.tar"), shardshuffle=False,
                        nodesplitter=lambda src: src).decode("pil").to_tuple("__key__", "webp", "txt")
    counts, n = Counter(), 0
    for key, img, txt in ds:
        assert key == f"s{n:07d}"
        captions = txt.splitlines()
        counts[len(captions)] += 1
        found = measure(img)
        assert len(found) == 2
        for c in captions:
            assert _true_paraphrase(c, found), (key, c, found)
        n += 1
    assert n == NUM_RETRIEVAL and set(counts) == {3, 4, 5}


# ----------------------------------------------------------------------------------------------------------- aro

def _vg_crop(root: Path, e: dict) -> Image.Image:
    img = Image.open(root / "images" / e["image_path"]).convert("RGB")
    return img.crop((e["bbox_x"], e["bbox_y"], e["bbox_x"] + e["bbox_w"], e["bbox_y"] + e["bbox_h"]))


def test_aro_visual_genome_files(world):
    root = Path(world.aro_dir)
    fields = {"image_id", "bbox_x", "bbox_y", "bbox_w", "bbox_h", "true_caption", "false_caption", "image_path"}
    relation = json.loads((root / "visual_genome_relation.json").read_text())
    assert isinstance(relation, list) and len(relation) == NUM_ARO
    for e in relation:
        assert set(e) >= fields | {"relation_name"} and e["relation_name"] in RELATIONS
        full, crop = measure(Image.open(root / "images" / e["image_path"])), measure(_vg_crop(root, e))
        # The box is the union of both objects: every object pixel is inside it, and the canvas is larger.
        assert {c: o["count"] for c, o in full.items()} == {c: o["count"] for c, o in crop.items()}
        assert e["bbox_w"] < Image.open(root / "images" / e["image_path"]).width
        as_np = lambda t: re.sub(r"^the (\w+) (\w+) is (.+) the (\w+) (\w+)$", r"a \1 \2 \3 a \4 \5", t)
        assert caption_true_of_pixels(as_np(e["true_caption"]), full), e
        assert not caption_true_of_pixels(as_np(e["false_caption"]), full), e
    attribution = json.loads((root / "visual_genome_attribution.json").read_text())
    pairs = Counter()
    for e in attribution:
        assert set(e) >= fields | {"attributes"}
        first, second = e["attributes"]
        pairs[(first, second)] += 1
        found = measure(_vg_crop(root, e))
        (c1, s1), (c2, s2) = (p.split()[1:] for p in e["true_caption"].split(" and "))
        assert (c1, c2) == (first, second) and found[c1]["shape"] == s1 and found[c2]["shape"] == s2
        (f1, g1), (f2, g2) = (p.split()[1:] for p in e["false_caption"].split(" and "))
        assert (f1, f2, g1, g2) == (second, first, s1, s2)  # the attributes swapped, the nouns kept
    assert len(pairs) == 4 and max(pairs.values()) - min(pairs.values()) <= 1


def test_aro_order_files(world):
    root = Path(world.aro_dir)
    for fname, folder in (("coco_karpathy_test.json", "val2014"), ("flickr30k_test.json", "flickr30k-images")):
        entries = json.loads((root / fname).read_text())
        assert isinstance(entries, list) and len(entries) == NUM_ARO
        for e in entries:
            assert e["image"].startswith(f"{folder}/") and 3 <= len(e["caption"]) <= 5
            found = measure(Image.open(root / e["image"]))
            for c in e["caption"]:
                assert c.endswith(".") and _true_paraphrase(c, found), (e, c, found)


# -------------------------------------------------------------------------------------------------- determinism

def test_same_seed_same_bytes_other_seed_other_world(tmp_path):
    kwargs = dict(num_train=24, samples_per_shard=10, num_eval_per_subset=3, num_zeroshot_per_class=1,
                  image_size=32, progress=False)
    write_world(tmp_path / "a", seed=7, **kwargs)
    write_world(tmp_path / "b", seed=7, **kwargs)
    write_world(tmp_path / "c", seed=8, **kwargs)
    a, b, c = (_all_files(tmp_path / n) for n in "abc")
    # world.json records its own path, the only file allowed to differ between the two copies.
    a.pop("world.json"), b.pop("world.json"), c.pop("world.json")
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a)
    assert a.keys() == c.keys()

    def captions(files):
        out = []
        for name in sorted(n for n in files if n.startswith("train/") and n.endswith(".tar")):
            with tarfile.open(fileobj=io.BytesIO(files[name])) as tar:
                out += [json.loads(tar.extractfile(m).read())["top_caption"] for m in tar
                        if m.name.endswith(".json")]
        return out

    assert captions(a) == captions(b)
    # Byte-identical across runs at different times too: headers carry no time or owner.
    with tarfile.open(tmp_path / "a" / "train" / "00000.tar") as tar:
        assert {(m.mtime, m.uname, m.uid) for m in tar} == {(0, "", 0)}
    assert sum(x != y for x, y in zip(captions(a), captions(c))) > len(captions(a)) // 2
    assert a["sugarcrepe/swap_att.json"] != c["sugarcrepe/swap_att.json"]


def test_scene_is_a_pure_function_of_seed_stream_index():
    # Regenerating one sample alone gives what a full pass gives: no shared generator state.
    first = [synthetic.sample_scene(synthetic._rng(3, "train", i), 2) for i in range(5)]
    again = synthetic.sample_scene(synthetic._rng(3, "train", 4), 2)
    assert again == first[4] and first[0] != first[1]


# ---------------------------------------------------------------------------------------------------- user input

@pytest.mark.parametrize("kwarg, value", [("num_train", 0), ("samples_per_shard", 0), ("num_eval_per_subset", -1),
                                          ("num_zeroshot_per_class", 0), ("image_size", 8), ("image_size", 4096),
                                          ("num_train", 2.5), ("seed", "x")])
def test_bad_arguments_are_one_line_value_errors(tmp_path, kwarg, value):
    with pytest.raises(ValueError, match=re.escape(repr(value))) as info:
        write_world(tmp_path / "w", **{kwarg: value, "progress": False})
    assert "\n" not in str(info.value) and kwarg in str(info.value)


def test_output_path_that_is_a_file_is_rejected(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        write_world(tmp_path / "f", num_train=1, progress=False)


def test_main_writes_a_world_and_reports_user_errors(tmp_path, capsys):
    out = tmp_path / "cli"
    rc = main(["--out", str(out), "--num-train", "12", "--samples-per-shard", "5", "--num-eval-per-subset", "2",
               "--num-zeroshot-per-class", "1", "--image-size", "32", "--seed", "5", "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert f"{out}/train/{{00000..00002}}.tar" in printed
    manifest = json.loads((out / "world.json").read_text())
    assert manifest["seed"] == 5 and manifest["num_train"] == 12
    assert main(["--out", str(tmp_path / "bad"), "--num-train", "0", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "num_train" in err and "0" in err
