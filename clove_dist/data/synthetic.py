"""A synthetic compositional world: coloured shapes of two sizes in spatial relations, with exact captions.

    clove-dist world --out data/world --num-train 20000
    python -m clove_dist.data.synthetic --out /tmp/world --num-train 512 --num-eval-per-subset 50

Everything is a pure function of the seed. Each image holds one or two objects; each object is a colour
(red, green, blue, yellow, purple, orange), a shape (circle, square, triangle, cross) and a size (small, large),
on a plain grey background. Two objects stand in one relation (to the left of, to the right of, above, below),
always with a different colour and a different shape, so "which colour belongs to which shape" is well posed:

    "a small red circle to the left of a large blue square"

Two training distributions, as in CLoVe: pre-training shards with alt-text only over a broader vocabulary (four
more colours, two more shapes), and fine-tuning shards with clean captions over the narrow one. No training image
shows a held-out colour-shape pair or (shape, relation, shape) triple; the SugarCrepe-format set is built on them,
and none of its captions equals a training caption.

The layout keeps the relation unambiguous: the two centres are at least 0.46 of the image apart along the
relation's axis (the objects never touch) and at most 0.08 apart across it, so exactly one of the four
relations holds.

Written under OUT:

    pretrain/{00000..}.tar     img2dataset layout of web data: {key}.jpg, {key}.txt (alt-text), {key}.json
    train/{00000..NNNNN}.tar   img2dataset / LAION-COCO layout: {key}.jpg, {key}.txt (noisy alt-text), {key}.json
                               ({"key", "top_caption" (clean caption), "caption" (the alt-text), "scene", ...});
                               keys are img2dataset's zero-padded shard*10^k + index strings ("000000123")
    sugarcrepe/                SugarCrepe's own format: replace_{obj,att,rel}.json, swap_{obj,att}.json,
                               add_{obj,att}.json ({"0": {"filename", "caption", "negative_caption"}, ...}),
                               images/, and scenes.json (the ground truth behind every image; not part of the format)
    zeroshot/                  CLIP_benchmark's webdataset layout: classnames.txt ("red square", "pink ring", ...),
                               zeroshot_classification_templates.txt ("a photo of a {c}."), test/{0..n}.tar with
                               {key}.webp (lossless) + {key}.cls, test/nshards.txt
    retrieval/                 CLIP_benchmark's retrieval layout: dataset_type.txt ("retrieval"), test/{0..n}.tar
                               with {key}.webp + {key}.txt (3-5 true captions, one per line), test/nshards.txt
    aro/                       ARO's files as distributed: visual_genome_{relation,attribution}.json + images/
                               (each scene pasted into a larger canvas; bbox_* is the union box of its objects),
                               coco_karpathy_test.json + val2014/, flickr30k_test.json + flickr30k-images/
    world.json                 the arguments and vocabulary this world was written with

retrieval/ and aro/ are written by synthetic_retrieval_aro.py. Every file is written to a temporary name and renamed, so a reader never sees half a shard. Tar headers carry no
time or owner, so the same seed gives byte-identical output.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import random
import sys
import tarfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from PIL import Image, ImageDraw
from tqdm import tqdm

# Saturated colours that stay far apart after JPEG (4:4:4, quality 95) and against any background grey used.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 230),
    "yellow": (240, 220, 30),
    "purple": (150, 40, 190),
    "orange": (250, 130, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
# The pre-training distribution is broader than the fine-tuning one, as web alt-text data is broader than
# LAION-COCO's captioned subset seen through a captioner: four more colours and two more shapes, which the
# fine-tuning shards never show (the zero-shot set measures whether fine-tuning forgets them).
PRETRAIN_COLOURS: dict[str, tuple[int, int, int]] = {**COLOURS, "pink": (250, 150, 200), "brown": (130, 75, 25),
                                                      "cyan": (30, 210, 220), "white": (245, 245, 245)}
PRETRAIN_SHAPES: tuple[str, ...] = (*SHAPES, "diamond", "ring")
# Held-out compositions: no training image (pre-training or fine-tuning) shows these colour-shape pairs or these
# (shape, relation, shape) triples (nor their mirror, "a square below a circle"), and the SugarCrepe-format set is
# built on them: it measures composition of known words, not recall of seen captions.
HELD_OUT_PAIRS: frozenset[tuple[str, str]] = frozenset({("red", "circle"), ("green", "square"),
                                                        ("blue", "triangle"), ("yellow", "cross")})
HELD_OUT_TRIPLES: frozenset[tuple[str, str, str]] = frozenset({
    ("circle", "above", "square"), ("triangle", "to the left of", "cross"), ("square", "to the left of", "triangle"),
    ("cross", "above", "circle")})
# Object extent (bounding-box side) as a fraction of the image side; the ranges are far apart so size is never
# a judgement call.
SIZES: dict[str, tuple[float, float]] = {"small": (0.20, 0.24), "large": (0.36, 0.42)}
RELATIONS: tuple[str, ...] = ("to the left of", "to the right of", "above", "below")
ATTRIBUTES: tuple[str, ...] = ("size", "colour")
_INVERSE = {"to the left of": "to the right of", "to the right of": "to the left of", "above": "below",
            "below": "above"}

SUGARCREPE_SUBSETS: tuple[str, ...] = ("replace_obj", "replace_att", "replace_rel", "swap_obj", "swap_att",
                                       "add_obj", "add_att")
ZEROSHOT_TEMPLATES: tuple[str, ...] = ("a photo of a {c}.", "a {c}.", "a picture of a {c}.",
                                       "a drawing of a {c}.", "a small {c}.", "a large {c}.")
ALT_TEXT_FILLERS: tuple[str, ...] = ("stock photo", "vector", "clipart", "free download", "illustration", "hd",
                                     "png", "wallpaper", "icon", "image", "royalty free", "design", "graphic",
                                     "shutterstock", "isolated", "background")

_P_SINGLE_TRAIN = 0.3  # share of one-object training images
_P_OMIT_TRAIN = 0.1  # chance that a training caption leaves out one given attribute of one object
_BACKGROUND_GREY = (95, 145)  # background grey level range, darker than yellow and lighter than blue/purple
_SUPERSAMPLE = 2  # draw at 2x and downsample: smooth edges at the cost of 4x pixels, still far under a second
_JPEG_QUALITY = 95  # img2dataset's default


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    size: str
    cx: float  # centre, fraction of the image width (0 = left)
    cy: float  # centre, fraction of the image height (0 = top)
    extent: float  # bounding-box side, fraction of the image side


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]  # one or two objects
    relation: str  # relation of objects[0] to objects[1]; "" for one object
    background: int  # grey level of the background


@dataclass(frozen=True)
class WorldPaths:
    root: str  # the output directory
    train_pattern: str  # brace pattern for webdataset, e.g. ".../train/{00000..00003}.tar"
    sugarcrepe_dir: str  # SugarCrepe-format directory (images under sugarcrepe_dir/images)
    zeroshot_dir: str  # CLIP_benchmark-format directory
    num_train: int  # training samples written
    num_train_shards: int  # training shards written
    retrieval_dir: str = ""  # CLIP_benchmark-format retrieval directory
    aro_dir: str = ""  # ARO-format directory (VG-Relation, VG-Attribution, COCO-Order, Flickr30k-Order)
    pretrain_pattern: str = ""  # brace pattern of the pre-training shards (alt-text only, broad vocabulary)
    num_pretrain: int = 0  # pre-training samples written


# ----------------------------------------------------------------------------------------------------- sampling

def _rng(seed: int, stream: str, index: int) -> random.Random:
    # One generator per (seed, stream, index): any sample can be regenerated alone, in any order or process.
    # String seeds go through SHA-512 in random.Random, so this does not depend on PYTHONHASHSEED.
    return random.Random(f"clove-world/{seed}/{stream}/{index}")


def _sample_object(rng: random.Random, shape: str, colour: str, size: str, cx: float, cy: float) -> Obj:
    lo, hi = SIZES[size]
    extent = rng.uniform(lo, hi)
    half = extent / 2
    return Obj(shape, colour, size, min(max(cx, half), 1 - half), min(max(cy, half), 1 - half), extent)


def sample_scene(rng: random.Random, num_objects: int, *, colours: tuple[str, ...] | None = None,
                 shapes: tuple[str, ...] = SHAPES, exclude_held_out: bool = False) -> Scene:
    """A random scene with one or two objects; two objects always differ in colour and in shape.

    `colours`/`shapes` are the vocabulary (default: the fine-tuning one); `exclude_held_out` redraws (from the same
    generator, so still a pure function of it) until no held-out pair or triple is in the scene.
    """
    if num_objects not in (1, 2):
        raise ValueError(f"num_objects must be 1 or 2, got {num_objects!r}")
    while True:
        scene = _draw_scene(rng, num_objects, tuple(colours or COLOURS), shapes)
        if not (exclude_held_out and held_out_in(scene)):
            return scene


def held_out_in(scene: Scene) -> bool:
    """Whether the scene shows a held-out colour-shape pair or (shape, relation, shape) triple."""
    if any((o.colour, o.shape) in HELD_OUT_PAIRS for o in scene.objects):
        return True
    if len(scene.objects) == 2:
        a, b = scene.objects
        return ((a.shape, scene.relation, b.shape) in HELD_OUT_TRIPLES
                or (b.shape, _INVERSE[scene.relation], a.shape) in HELD_OUT_TRIPLES)
    return False


def _draw_scene(rng: random.Random, num_objects: int, colours: tuple[str, ...], shapes: tuple[str, ...]) -> Scene:
    background = rng.randint(*_BACKGROUND_GREY)
    colours = rng.sample(list(colours), num_objects)
    shapes = rng.sample(list(shapes), num_objects)
    sizes = [rng.choice(list(SIZES)) for _ in range(num_objects)]
    if num_objects == 1:
        obj = _sample_object(rng, shapes[0], colours[0], sizes[0], rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8))
        return Scene((obj,), "", background)
    relation = rng.choice(RELATIONS)
    # Along the relation's axis the centres sit near 0.25 and 0.75, at least 0.46 apart: two large objects
    # (half-extents <= 0.21 each) never touch, and no clamping moves them. Across it they share a coordinate
    # up to +-0.04 each.
    near, far = 0.25 + rng.uniform(-0.02, 0.02), 0.75 + rng.uniform(-0.02, 0.02)
    across = rng.uniform(0.3, 0.7)
    first_along, second_along = (near, far) if relation in ("to the left of", "above") else (far, near)
    objs = []
    for i, along in enumerate((first_along, second_along)):
        other = across + rng.uniform(-0.04, 0.04)
        cx, cy = (along, other) if relation in ("to the left of", "to the right of") else (other, along)
        objs.append(_sample_object(rng, shapes[i], colours[i], sizes[i], cx, cy))
    return Scene(tuple(objs), relation, background)


def relation_holds(scene: Scene, relation: str) -> bool:
    """Whether `objects[0] relation objects[1]` is true of the scene's geometry."""
    a, b = scene.objects
    dx, dy = b.cx - a.cx, b.cy - a.cy
    if relation in ("to the left of", "to the right of"):
        horizontal = abs(dx) > abs(dy)
        return horizontal and ((dx > 0) == (relation == "to the left of"))
    vertical = abs(dy) > abs(dx)
    return vertical and ((dy > 0) == (relation == "above"))


# ------------------------------------------------------------------------------------------------------ captions

def describe(obj: Obj, *, size: bool = True, colour: bool = True) -> str:
    """Noun phrase for one object: "a small red circle", "an orange cross"; `size`/`colour` False leave that word
    out."""
    words = ([obj.size] if size else []) + ([obj.colour] if colour else []) + [obj.shape]
    return " ".join(["an" if words[0][0] in "aeiou" else "a"] + words)


def caption(scene: Scene, omit: frozenset[tuple[int, str]] = frozenset()) -> str:
    """The true caption of a scene; `omit` holds (object index, "size" | "colour") pairs to leave out."""
    phrases = [describe(o, size=(i, "size") not in omit, colour=(i, "colour") not in omit)
               for i, o in enumerate(scene.objects)]
    return phrases[0] if len(phrases) == 1 else f"{phrases[0]} {scene.relation} {phrases[1]}"


def alt_text(rng: random.Random, clean: str) -> str:
    """A noisy web alt-text for a caption: content words dropped and shuffled, filler words added."""
    stop = {"a", "an", "the", "to", "of"}
    words = [w for w in clean.split() if w not in stop and rng.random() < 0.7]
    words += rng.sample(ALT_TEXT_FILLERS, rng.randint(1, 3))
    rng.shuffle(words)
    if rng.random() < 0.2:
        words.append(str(rng.randint(1, 9999)))
    return " ".join(words)


def _train_caption(rng: random.Random, scene: Scene) -> str:
    omit = frozenset((i, a) for i in range(len(scene.objects)) for a in ATTRIBUTES if rng.random() < _P_OMIT_TRAIN)
    return caption(scene, omit)


# --------------------------------------------------------------------------------------------------- negatives

def _other(rng: random.Random, options, current: str) -> str:
    return rng.choice([o for o in options if o != current])


def sugarcrepe_pair(rng: random.Random, subset: str, scene: Scene) -> tuple[str, str]:
    """(positive, negative) captions for one SugarCrepe subset; the positive is true, the negative false.

    add_obj needs a one-object scene, every other subset a two-object scene.
    """
    objs = scene.objects
    if subset == "add_obj":
        if len(objs) != 1:
            raise ValueError("add_obj needs a one-object scene")
        absent = Obj(rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(list(SIZES)), 0.5, 0.5, 0.3)
        positive = caption(scene)
        return positive, f"{positive} {rng.choice(RELATIONS)} {describe(absent)}"
    if len(objs) != 2:
        raise ValueError(f"{subset} needs a two-object scene")
    positive = caption(scene)
    j = rng.randrange(2)
    if subset == "replace_obj":
        changed = list(objs)
        changed[j] = replace(objs[j], shape=_other(rng, SHAPES, objs[j].shape))
        return positive, caption(replace(scene, objects=tuple(changed)))
    if subset == "replace_att":
        attr = rng.choice(ATTRIBUTES)
        changed = list(objs)
        if attr == "colour":
            changed[j] = replace(objs[j], colour=_other(rng, COLOURS, objs[j].colour))
        else:
            changed[j] = replace(objs[j], size=_other(rng, SIZES, objs[j].size))
        return positive, caption(replace(scene, objects=tuple(changed)))
    if subset == "replace_rel":
        return positive, caption(replace(scene, relation=_other(rng, RELATIONS, scene.relation)))
    if subset == "swap_obj":
        # Both noun phrases trade places around the same relation: the words are the same, the meaning is not.
        return positive, caption(replace(scene, objects=(objs[1], objs[0])))
    if subset == "swap_att":
        differing = [a for a in ATTRIBUTES if getattr(objs[0], a) != getattr(objs[1], a)]
        attr = rng.choice(differing)  # colour always differs, so never empty
        a, b = objs
        swapped = (replace(a, **{attr: getattr(b, attr)}), replace(b, **{attr: getattr(a, attr)}))
        return positive, caption(replace(scene, objects=swapped))
    if subset == "add_att":
        attr = rng.choice(ATTRIBUTES)
        omit = frozenset({(j, attr)})
        wrong = list(objs)
        options = COLOURS if attr == "colour" else SIZES
        wrong[j] = replace(objs[j], **{attr: _other(rng, options, getattr(objs[j], attr))})
        return caption(scene, omit), caption(replace(scene, objects=tuple(wrong)))
    raise ValueError(f"unknown SugarCrepe subset {subset!r}; expected one of {', '.join(SUGARCREPE_SUBSETS)}")


# ---------------------------------------------------------------------------------------------------- rendering

def render(scene: Scene, image_size: int) -> Image.Image:
    """Draw a scene as an RGB image of image_size x image_size pixels."""
    side = image_size * _SUPERSAMPLE
    grey = scene.background
    img = Image.new("RGB", (side, side), (grey, grey, grey))
    draw = ImageDraw.Draw(img)
    for obj in scene.objects:
        cx, cy, h = obj.cx * side, obj.cy * side, obj.extent * side / 2
        fill = PRETRAIN_COLOURS[obj.colour]
        if obj.shape == "circle":
            draw.ellipse((cx - h, cy - h, cx + h, cy + h), fill=fill)
        elif obj.shape == "square":
            draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
        elif obj.shape == "triangle":
            draw.polygon([(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)], fill=fill)
        elif obj.shape == "cross":
            arm = h * 0.36  # half-width of each bar: thick enough to stay a cross when small
            draw.rectangle((cx - h, cy - arm, cx + h, cy + arm), fill=fill)
            draw.rectangle((cx - arm, cy - h, cx + arm, cy + h), fill=fill)
        elif obj.shape == "diamond":
            draw.polygon([(cx, cy - h), (cx + h, cy), (cx, cy + h), (cx - h, cy)], fill=fill)
        elif obj.shape == "ring":
            hole = h * 0.55  # inner radius: the band stays about 3 px wide on a small ring at 64 px
            draw.ellipse((cx - h, cy - h, cx + h, cy + h), fill=fill)
            draw.ellipse((cx - hole, cy - hole, cx + hole, cy + hole), fill=(grey, grey, grey))
        else:
            raise AssertionError(f"unknown shape {obj.shape}")
    return img.reduce(_SUPERSAMPLE) if _SUPERSAMPLE > 1 else img


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "jpg":
        img.save(buf, format="JPEG", quality=_JPEG_QUALITY, subsampling=0)
    elif fmt == "webp":
        img.save(buf, format="WEBP", lossless=True)
    else:
        raise AssertionError(fmt)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------------- writing

def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class _ShardWriter:
    """A tar shard with fixed headers (no time, no owner), written under a temporary name, renamed on close."""

    def __init__(self, path: Path):
        self.path = path
        self.tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        self.tar = tarfile.open(self.tmp, "w", format=tarfile.USTAR_FORMAT)

    def add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = len(data), 0o444, 0
        self.tar.addfile(info, io.BytesIO(data))

    def close(self) -> None:
        self.tar.close()
        os.replace(self.tmp, self.path)


def _json_bytes(obj, indent: int | None = None) -> bytes:
    return json.dumps(obj, indent=indent, ensure_ascii=False).encode("utf-8")


def _scene_dict(scene: Scene) -> dict:
    return {"objects": [asdict(o) for o in scene.objects], "relation": scene.relation,
            "background": scene.background}


def _key_digits(samples_per_shard: int) -> int:
    # img2dataset: key = shard_id * 10**k + index, k = ceil(log10(samples_per_shard)), written with 5 + k digits;
    # k is at least 4 so keys are the familiar 9 digits for any shard of up to 10,000 samples.
    return max(4, math.ceil(math.log10(samples_per_shard)))


def _write_train(root: Path, seed: int, num_train: int, samples_per_shard: int, image_size: int,
                 progress: bool, *, pretrain: bool = False) -> tuple[str, int, set[str]]:
    """Fine-tuning shards (train/, LAION-COCO layout: clean top_caption + alt-text) or pre-training shards
    (pretrain/, LAION-400M layout: alt-text only, broad vocabulary). Returns the pattern, the shard count and
    every caption written (both fields), which the evaluation sets are kept apart from."""
    out = root / ("pretrain" if pretrain else "train")
    out.mkdir(parents=True, exist_ok=True)
    num_shards = math.ceil(num_train / samples_per_shard)
    k = _key_digits(samples_per_shard)
    stream = "pretrain" if pretrain else "train"
    captions: set[str] = set()
    bar = tqdm(total=num_train, desc=f"world: {stream}", unit="img", disable=not progress)
    for shard in range(num_shards):
        writer = _ShardWriter(out / f"{shard:05d}.tar")
        count = min(samples_per_shard, num_train - shard * samples_per_shard)
        for i in range(count):
            index = shard * samples_per_shard + i
            rng = _rng(seed, stream, index)
            num_objects = 1 if rng.random() < _P_SINGLE_TRAIN else 2
            if pretrain:
                scene = sample_scene(rng, num_objects, colours=tuple(PRETRAIN_COLOURS), shapes=PRETRAIN_SHAPES,
                                     exclude_held_out=True)
            else:
                scene = sample_scene(rng, num_objects, exclude_held_out=True)
            clean = _train_caption(rng, scene)
            noisy = alt_text(rng, clean)
            key = f"{shard * 10 ** k + i:0{5 + k}d}"
            meta = {"url": f"synthetic://world/{seed}/{stream}/{index}", "key": key, "status": "success",
                    "error_message": None, "width": image_size, "height": image_size,
                    "original_width": image_size, "original_height": image_size, "caption": noisy}
            if not pretrain:  # LAION-COCO adds the captioner's output; the web data has only its alt-text
                meta.update({"top_caption": clean, "all_captions": [clean]})
                captions.add(clean)
            meta["scene"] = _scene_dict(scene)
            captions.add(noisy)
            writer.add(f"{key}.jpg", _encode(render(scene, image_size), "jpg"))
            writer.add(f"{key}.txt", noisy.encode("utf-8"))
            writer.add(f"{key}.json", _json_bytes(meta))
            bar.update(1)
        writer.close()
        stats = {"count": count, "successes": count, "failed_to_download": 0, "failed_to_resize": 0}
        _atomic_write(out / f"{shard:05d}_stats.json", _json_bytes(stats, indent=4))
    bar.close()
    return str(out / f"{{00000..{num_shards - 1:05d}}}.tar"), num_shards, captions


_MAX_DRAWS = 50  # draws of a negative, or of a scene, before giving up: in practice a few suffice


def _held_out_scene(rng: random.Random, num_objects: int) -> Scene:
    """A fine-tuning-vocabulary scene that shows a held-out pair or triple (redrawn from `rng` until it does)."""
    for _ in range(1000):  # about one in three two-object scenes and one in six one-object scenes qualifies
        scene = sample_scene(rng, num_objects)
        if held_out_in(scene):
            return scene
    raise AssertionError("no held-out scene in 1000 draws")


def _eval_pairs(seed: int, index: int, num_objects: int, subsets: tuple[str, ...], seen: set[str],
                held_out: bool = True) -> tuple[Scene, dict[str, tuple[str, str]]]:
    """One evaluation scene and a (positive, negative) pair per subset, no caption of which occurs in `seen`. The
    scene shows a held-out composition, or with `held_out` False none (from streams of their own)."""
    prefix = "sugarcrepe" if held_out else "sugarcrepe-seen"
    stream = f"{prefix}-pair" if num_objects == 2 else f"{prefix}-single"
    scene_rng = _rng(seed, stream, index)
    # Training holds most full captions of seen compositions (93% of them with 20,000 images each side), so that
    # set draws scenes far longer; a scene whose full caption training holds is passed over before any pair.
    draws = _MAX_DRAWS if held_out else _MAX_DRAWS * 200
    for _ in range(draws):
        scene = _held_out_scene(scene_rng, num_objects) if held_out else \
            sample_scene(scene_rng, num_objects, exclude_held_out=True)
        if caption(scene) in seen:  # never for a held-out scene: its caption names a held-out pair or triple
            continue
        pairs = {}
        for subset in subsets:
            rng = _rng(seed, f"{prefix}-{subset}", index)
            for _ in range(_MAX_DRAWS):
                pos, neg = sugarcrepe_pair(rng, subset, scene)
                if pos not in seen and neg not in seen:
                    pairs[subset] = (pos, neg)
                    break
            else:
                break  # this scene cannot give an unseen pair for `subset`: draw another scene
        if len(pairs) == len(subsets):
            return scene, pairs
    if held_out:
        raise AssertionError(f"no unseen evaluation pair for scene {index} in {draws} draws")
    raise ValueError(f"no seen-composition scene with captions outside the training shards in {draws} draws "
                     f"(scene {index}): the shards hold nearly every caption of the seen compositions")


def write_sugarcrepe(out: Path, seed: int, num_per_subset: int, image_size: int, seen: set[str], *,
                     held_out: bool = True, progress: bool = False) -> str:
    """A SugarCrepe-format set in `out`; no positive or negative caption is in `seen` (the training captions).
    Every image shows a held-out composition (the world's set), or with `held_out` False only compositions that
    training shows, in captions it does not: the two sets apart tell composition from recall of seen pairs. The
    second set has no add_obj: its one-object captions are few, and training holds nearly all of them."""
    (out / "images").mkdir(parents=True, exist_ok=True)
    # Like the real benchmark (COCO val2017 images reused across subsets), the six two-object subsets share one
    # pool of images, so an evaluator that encodes each unique image once has real work to save.
    two = tuple(s for s in SUGARCREPE_SUBSETS if s != "add_obj")
    pools = {2: [_eval_pairs(seed, i, 2, two, seen, held_out) for i in range(num_per_subset)],
             1: [_eval_pairs(seed, i, 1, ("add_obj",), seen) for i in range(num_per_subset) if held_out]}
    names = {2: [f"{i:012d}.jpg" for i in range(num_per_subset)],
             1: [f"{num_per_subset + i:012d}.jpg" for i in range(num_per_subset)]}
    bar = tqdm(total=len(pools[1]) + len(pools[2]), desc="world: sugarcrepe", unit="img", disable=not progress)
    scenes = {}
    for n in (2, 1):
        for name, (scene, _) in zip(names[n], pools[n]):
            _atomic_write(out / "images" / name, _encode(render(scene, image_size), "jpg"))
            scenes[name] = _scene_dict(scene)
            bar.update(1)
    bar.close()
    for subset in SUGARCREPE_SUBSETS if held_out else two:
        n = 1 if subset == "add_obj" else 2
        entries = {}
        for i, (name, (_, pairs)) in enumerate(zip(names[n], pools[n])):
            pos, neg = pairs[subset]
            entries[str(i)] = {"filename": name, "caption": pos, "negative_caption": neg}
        _atomic_write(out / f"{subset}.json", _json_bytes(entries, indent=4))
    _atomic_write(out / "scenes.json", _json_bytes(scenes, indent=1))
    return str(out)


def zeroshot_classnames() -> list[str]:
    """The zero-shot classes: every colour-shape pair of the pre-training vocabulary ("red square", "pink ring",
    ...) that pre-training shows (held-out pairs left out), in a fixed order."""
    return [f"{c} {s}" for c in PRETRAIN_COLOURS for s in PRETRAIN_SHAPES if (c, s) not in HELD_OUT_PAIRS]


def _write_zeroshot(root: Path, seed: int, num_per_class: int, samples_per_shard: int, image_size: int,
                    progress: bool) -> str:
    out = root / "zeroshot"
    (out / "test").mkdir(parents=True, exist_ok=True)
    classes = zeroshot_classnames()
    _atomic_write(out / "classnames.txt", ("\n".join(classes) + "\n").encode())
    _atomic_write(out / "zeroshot_classification_templates.txt", ("\n".join(ZEROSHOT_TEMPLATES) + "\n").encode())
    total = num_per_class * len(classes)
    order = list(range(total))
    random.Random(f"clove-world/{seed}/zeroshot-order").shuffle(order)  # classes interleaved across shards
    num_shards = math.ceil(total / samples_per_shard)
    bar = tqdm(total=total, desc="world: zeroshot", unit="img", disable=not progress)
    for shard in range(num_shards):
        writer = _ShardWriter(out / "test" / f"{shard}.tar")
        for index in range(shard * samples_per_shard, min(total, (shard + 1) * samples_per_shard)):
            item = order[index]
            label = item % len(classes)
            colour, shape = classes[label].split(" ")
            rng = _rng(seed, "zeroshot", item)
            obj = _sample_object(rng, shape, colour, rng.choice(list(SIZES)), rng.uniform(0.2, 0.8),
                                 rng.uniform(0.2, 0.8))
            scene = Scene((obj,), "", rng.randint(*_BACKGROUND_GREY))
            key = f"s{index:07d}"  # CLIP_benchmark's key format
            writer.add(f"{key}.webp", _encode(render(scene, image_size), "webp"))
            writer.add(f"{key}.cls", str(label).encode())
            bar.update(1)
        writer.close()
    bar.close()
    _atomic_write(out / "test" / "nshards.txt", f"{num_shards}\n".encode())
    return str(out)


def _check_count(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def write_world(out_dir: str | os.PathLike, *, seed: int = 0, num_train: int = 20_000,
                samples_per_shard: int = 5_000, num_eval_per_subset: int = 500, num_zeroshot_per_class: int = 20,
                image_size: int = 64, num_retrieval_images: int = 200, num_aro_per_subset: int = 100,
                num_pretrain: int | None = None, progress: bool = True) -> WorldPaths:
    """Write the pre-training and fine-tuning shards, the SugarCrepe-format, zero-shot, retrieval and ARO-format
    sets under out_dir. `num_pretrain` None writes as many pre-training samples as fine-tuning ones.

    Deterministic in `seed` (byte-identical files for the same arguments). ValueError on bad arguments.
    """
    num_pretrain = num_train if num_pretrain is None else num_pretrain
    _check_count("seed", seed, -2 ** 63)
    _check_count("num_train", num_train, 1)
    _check_count("num_pretrain", num_pretrain, 1)
    _check_count("samples_per_shard", samples_per_shard, 1)
    _check_count("num_eval_per_subset", num_eval_per_subset, 1)
    _check_count("num_zeroshot_per_class", num_zeroshot_per_class, 1)
    _check_count("image_size", image_size, 16)
    _check_count("num_retrieval_images", num_retrieval_images, 1)
    _check_count("num_aro_per_subset", num_aro_per_subset, 1)
    if image_size > 1024:
        raise ValueError(f"image_size must be at most 1024, got {image_size!r}")
    root = Path(out_dir)
    if root.exists() and not root.is_dir():
        raise ValueError(f"output path exists and is not a directory: {root}")
    root.mkdir(parents=True, exist_ok=True)
    from .synthetic_retrieval_aro import _write_aro, _write_retrieval  # imports this module: import here
    pretrain_pattern, _, seen = _write_train(root, seed, num_pretrain, samples_per_shard, image_size, progress,
                                             pretrain=True)
    train_pattern, num_shards, seen_ft = _write_train(root, seed, num_train, samples_per_shard, image_size, progress)
    sugarcrepe_dir = write_sugarcrepe(root / "sugarcrepe", seed, num_eval_per_subset, image_size, seen | seen_ft,
                                      progress=progress)
    zeroshot_dir = _write_zeroshot(root, seed, num_zeroshot_per_class, samples_per_shard, image_size, progress)
    retrieval_dir = _write_retrieval(root, seed, num_retrieval_images, samples_per_shard, image_size, progress)
    aro_dir = _write_aro(root, seed, num_aro_per_subset, image_size, progress)
    paths = WorldPaths(str(root), train_pattern, sugarcrepe_dir, zeroshot_dir, num_train, num_shards, retrieval_dir,
                       aro_dir, pretrain_pattern, num_pretrain)
    manifest = {"seed": seed, "num_train": num_train, "num_pretrain": num_pretrain,
                "samples_per_shard": samples_per_shard,
                "num_eval_per_subset": num_eval_per_subset, "num_zeroshot_per_class": num_zeroshot_per_class,
                "num_retrieval_images": num_retrieval_images, "num_aro_per_subset": num_aro_per_subset,
                "image_size": image_size, "colours": COLOURS, "shapes": SHAPES, "sizes": list(SIZES),
                "relations": RELATIONS, "pretrain_colours": PRETRAIN_COLOURS, "pretrain_shapes": PRETRAIN_SHAPES,
                "held_out_pairs": sorted(HELD_OUT_PAIRS), "held_out_triples": sorted(HELD_OUT_TRIPLES),
                "paths": asdict(paths)}
    _atomic_write(root / "world.json", _json_bytes(manifest, indent=2))
    return paths


def main(argv: list[str] | None = None) -> int:
    """`clove-dist world --out DIR ...`: write a synthetic world; 0 on success, 2 on a user error."""
    p = argparse.ArgumentParser(prog="clove-dist world", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0, help="world seed (same seed, same bytes)")
    p.add_argument("--num-train", type=int, default=20_000, help="fine-tuning images (LAION-COCO layout)")
    p.add_argument("--num-pretrain", type=int, default=None, help="pre-training images (default: --num-train)")
    p.add_argument("--samples-per-shard", type=int, default=5_000, help="samples per tar shard")
    p.add_argument("--num-eval-per-subset", type=int, default=500, help="examples in each SugarCrepe subset")
    p.add_argument("--num-zeroshot-per-class", type=int, default=20, help="zero-shot test images per class")
    p.add_argument("--image-size", type=int, default=64, help="image side in pixels")
    p.add_argument("--num-retrieval-images", type=int, default=200, help="images of the retrieval set")
    p.add_argument("--num-aro-per-subset", type=int, default=100, help="examples (images) per ARO subset")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    try:
        paths = write_world(args.out, seed=args.seed, num_train=args.num_train,
                            samples_per_shard=args.samples_per_shard, num_eval_per_subset=args.num_eval_per_subset,
                            num_zeroshot_per_class=args.num_zeroshot_per_class, image_size=args.image_size,
                            num_retrieval_images=args.num_retrieval_images,
                            num_aro_per_subset=args.num_aro_per_subset, num_pretrain=args.num_pretrain,
                            progress=not args.no_progress)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"pretrain:   {paths.pretrain_pattern} ({paths.num_pretrain} samples)")
    print(f"train:      {paths.train_pattern} ({paths.num_train} samples)")
    print(f"sugarcrepe: {paths.sugarcrepe_dir}")
    print(f"zeroshot:   {paths.zeroshot_dir}")
    print(f"retrieval:  {paths.retrieval_dir}")
    print(f"aro:        {paths.aro_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
