"""The synthetic world's retrieval and ARO-format sets: true paraphrases per image, and ARO's four files.

Written by `clove_dist.data.synthetic.write_world` (see its docstring for the layout); both sets use the
fine-tuning vocabulary and are not held out from training (they check formats and evaluators, not composition).
"""
from __future__ import annotations

import math
import random
from dataclasses import replace
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from .synthetic import (_INVERSE, Obj, Scene, _atomic_write, _encode, _json_bytes, _rng, _ShardWriter, caption,
                        describe, render, sample_scene)


def paraphrases(rng: random.Random, scene: Scene) -> list[str]:
    """Three to five true captions of a two-object scene, several wordings as COCO's five annotators give."""
    a, b = scene.objects
    everything = [caption(scene),
                  f"{describe(b)} {_INVERSE[scene.relation]} {describe(a)}",
                  caption(scene, frozenset({(0, "size"), (1, "size")})),
                  f"there is {caption(scene)}",
                  f"{describe(a, size=False)} and {describe(b, size=False)}"]
    return everything[:rng.randint(3, 5)]


def _write_retrieval(root: Path, seed: int, num_images: int, samples_per_shard: int, image_size: int,
                     progress: bool) -> str:
    out = root / "retrieval"
    (out / "test").mkdir(parents=True, exist_ok=True)
    _atomic_write(out / "dataset_type.txt", b"retrieval\n")
    num_shards = math.ceil(num_images / samples_per_shard)
    bar = tqdm(total=num_images, desc="world: retrieval", unit="img", disable=not progress)
    for shard in range(num_shards):
        writer = _ShardWriter(out / "test" / f"{shard}.tar")
        for index in range(shard * samples_per_shard, min(num_images, (shard + 1) * samples_per_shard)):
            rng = _rng(seed, "retrieval", index)
            scene = sample_scene(rng, 2)
            key = f"s{index:07d}"  # CLIP_benchmark's key format; captions one per line in .txt
            writer.add(f"{key}.webp", _encode(render(scene, image_size), "webp"))
            writer.add(f"{key}.txt", "\n".join(paraphrases(rng, scene)).encode("utf-8"))
            bar.update(1)
        writer.close()
    bar.close()
    _atomic_write(out / "test" / "nshards.txt", f"{num_shards}\n".encode())
    return str(out)


# Four ordered colour pairs: with 100 examples each VG-Attribution pair reaches the benchmark's 25-example floor.
_ARO_ATTRIBUTE_PAIRS: tuple[tuple[str, str], ...] = (("red", "blue"), ("green", "yellow"), ("purple", "orange"),
                                                     ("blue", "green"))


def _vg_image(scene: Scene, image_size: int) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """The scene pasted into a larger black-bordered canvas, as a crop of a bigger photograph, and the union box
    (x, y, w, h) of its two objects in canvas pixels."""
    side = image_size * 3 // 2
    offset = (side - image_size) // 2
    canvas = Image.new("RGB", (side, side), (0, 0, 0))
    canvas.paste(render(scene, image_size), (offset, offset))
    boxes = [((o.cx - o.extent / 2) * image_size, (o.cy - o.extent / 2) * image_size,
              (o.cx + o.extent / 2) * image_size, (o.cy + o.extent / 2) * image_size) for o in scene.objects]
    x0 = int(min(b[0] for b in boxes)) + offset
    y0 = int(min(b[1] for b in boxes)) + offset
    x1 = math.ceil(max(b[2] for b in boxes)) + offset
    y1 = math.ceil(max(b[3] for b in boxes)) + offset
    return canvas, (x0, y0, x1 - x0, y1 - y0)


def _the(obj: Obj) -> str:
    return f"the {obj.colour} {obj.shape}"


def _write_aro(root: Path, seed: int, num_per_subset: int, image_size: int, progress: bool) -> str:
    out = root / "aro"
    for d in ("images", "val2014", "flickr30k-images"):
        (out / d).mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=4 * num_per_subset, desc="world: aro", unit="img", disable=not progress)
    relation, attribution = [], []
    for i in range(num_per_subset):
        scene = sample_scene(_rng(seed, "aro-vg-relation", i), 2)
        image_id = 1_000_000 + i
        canvas, (x, y, w, h) = _vg_image(scene, image_size)
        _atomic_write(out / "images" / f"{image_id}.jpg", _encode(canvas, "jpg"))
        a, b = scene.objects
        relation.append({"image_id": str(image_id), "relation_name": scene.relation, "bbox_x": x, "bbox_y": y,
                         "bbox_w": w, "bbox_h": h, "true_caption": f"{_the(a)} is {scene.relation} {_the(b)}",
                         "false_caption": f"{_the(b)} is {scene.relation} {_the(a)}",
                         "image_path": f"{image_id}.jpg", "subj": _the(a)[4:], "obj": _the(b)[4:]})
        bar.update(1)
    for i in range(num_per_subset):
        first, second = _ARO_ATTRIBUTE_PAIRS[i % len(_ARO_ATTRIBUTE_PAIRS)]
        base = sample_scene(_rng(seed, "aro-vg-attribution", i), 2)
        scene = replace(base, objects=(replace(base.objects[0], colour=first), replace(base.objects[1], colour=second)))
        image_id = 2_000_000 + i
        canvas, (x, y, w, h) = _vg_image(scene, image_size)
        _atomic_write(out / "images" / f"{image_id}.jpg", _encode(canvas, "jpg"))
        a, b = scene.objects
        attribution.append({"image_id": str(image_id), "bbox_x": x, "bbox_y": y, "bbox_w": w, "bbox_h": h,
                            "true_caption": f"the {first} {a.shape} and the {second} {b.shape}",
                            "false_caption": f"the {second} {a.shape} and the {first} {b.shape}",
                            "image_path": f"{image_id}.jpg", "attributes": [first, second],
                            "obj1_name": a.shape, "obj2_name": b.shape})
        bar.update(1)
    _atomic_write(out / "visual_genome_relation.json", _json_bytes(relation))
    _atomic_write(out / "visual_genome_attribution.json", _json_bytes(attribution))
    for stream, folder, fname, name in (("aro-coco", "val2014", "coco_karpathy_test.json", "COCO_val2014_{:012d}.jpg"),
                                        ("aro-flickr", "flickr30k-images", "flickr30k_test.json", "{}.jpg")):
        entries = []
        for i in range(num_per_subset):
            rng = _rng(seed, stream, i)
            scene = sample_scene(rng, 2)
            image = f"{folder}/{name.format(3_000_000 + i)}"
            _atomic_write(out / image, _encode(render(scene, image_size), "jpg"))
            entries.append({"image": image, "caption": [c + "." for c in paraphrases(rng, scene)],
                            "image_id": str(3_000_000 + i)})
            bar.update(1)
        _atomic_write(out / fname, _json_bytes(entries))
    bar.close()
    return str(out)
