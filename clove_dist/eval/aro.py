"""ARO (Yuksekgonul et al., "When and why vision-language models behave like bags-of-words", ICLR 2023).

    from clove_dist.eval import aro
    m = aro.evaluate(model, preprocess, tokenizer, "aro", coco_root="coco/2014", flickr_root="flickr30k")
    m["vg_relation"]["macro_accuracy"], m["vg_attribution"]["macro_accuracy"], m["coco_order"]["accuracy"]

Reads the files as the benchmark distributes them; every subset whose JSON is present is evaluated:

    data_dir/visual_genome_relation.json     [{"image_path", "bbox_x", "bbox_y", "bbox_w", "bbox_h",
                                               "true_caption", "false_caption", "relation_name", ...}, ...]
    data_dir/visual_genome_attribution.json  the same fields, with "attributes": [a1, a2] for "relation_name"
    data_dir/images/                         the Visual Genome images of both (vgr_vga_images.zip)
    data_dir/coco_karpathy_test.json         [{"image": "val2014/COCO_val2014_....jpg", "caption": [5 captions]}]
    data_dir/flickr30k_test.json             [{"image": "flickr30k-images/....jpg", "caption": [5 captions]}]

COCO and Flickr30k image paths are relative to coco_root / flickr_root (default: data_dir).

Metrics, each as published:
  VG-Relation: the image is cropped to the box (bbox_x, bbox_y, bbox_x + bbox_w, bbox_y + bbox_h), the union of
    subject and object; an example is right when the true caption scores strictly higher than the false one (the
    benchmark's argmax over [false, true] gives a tie to the false caption). macro_accuracy is the mean of the
    per-relation accuracies over relations outside the benchmark's list of symmetric relations (its
    notebook's exclusion list; for "next to" or "near" swapping subject and object keeps the caption true).
  VG-Attribution: the same crop and rule; macro_accuracy is the mean over attribute pairs ("a1_a2") with at least
    25 examples, as the benchmark reports it.
  COCO-Order, Flickr30k-Order: every caption of every image is one example with five options, the caption and
    its four perturbations (see aro_order), seeded per caption. Right when the true caption scores strictly
    higher than every perturbation that differs from it: a perturbation identical to the caption (a short
    caption, a repeated word) is not a distinct option, and an example with no distinct option at all is left
    out and counted in num_no_distinct_option. accuracy is the micro average over the examples.
Scores are cosine similarities; each unique image crop and each unique text is encoded once.

Each subset reports num_examples, num_evaluated, num_missing_images, num_malformed. In strict mode (default) more
than max_missing_share of a subset's images missing is an error. A directory without any of the four files, a
file that is not this benchmark's JSON, or a subset with no example is a ValueError naming the file.
"""
from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from . import _check_batch_size, encode_images, encode_texts, eval_mode
from .aro_order import OrderPerturber
from .sharding import Shard, gather_rows
from .wds_layout import check_missing_share, describe_kind

SUBSET_FILES: dict[str, str] = {"vg_relation": "visual_genome_relation.json",
                                "vg_attribution": "visual_genome_attribution.json",
                                "coco_order": "coco_karpathy_test.json", "flickr30k_order": "flickr30k_test.json"}
VG_FIELDS: tuple[str, ...] = ("image_path", "bbox_x", "bbox_y", "bbox_w", "bbox_h", "true_caption", "false_caption")
ORDER_FIELDS: tuple[str, ...] = ("image", "caption")
MIN_ATTRIBUTE_PAIR_COUNT = 25  # VG-Attribution reports attribute pairs with at least this many examples
# Relations the benchmark's notebook leaves out of the VG-Relation macro accuracy (symmetric or nearly so).
SYMMETRIC_RELATIONS: frozenset[str] = frozenset("""adjusting|attached to|between|bigger than|biting|boarding|brushing|
chewing|cleaning|climbing|close to|coming from|coming out of|contain|crossing|dragging|draped over|drinking|
drinking from|driving|driving down|driving on|eating from|eating in|enclosing|exiting|facing|filled with|
floating in|floating on|flying|flying above|flying in|flying over|flying through|full of|going down|going into|
going through|grazing in|growing in|growing on|guiding|hanging from|hanging in|hanging off|hanging over|
higher than|holding onto|hugging|in between|jumping off|jumping on|jumping over|kept in|larger than|leading|
leaning over|leaving|licking|longer than|looking in|looking into|looking out|looking over|looking through|
lying next to|lying on top of|making|mixed with|mounted on|moving|on the back of|on the edge of|on the front of|
on the other side of|opening|painted on|parked at|parked beside|parked by|parked in|parked in front of|
parked near|parked next to|perched on|petting|piled on|playing|playing in|playing on|playing with|pouring|
reaching for|reading|reflected on|riding on|running in|running on|running through|seen through|sitting behind|
sitting beside|sitting by|sitting in front of|sitting near|sitting next to|sitting under|skiing down|skiing on|
sleeping in|sleeping on|smiling at|sniffing|splashing|sprinkled on|stacked on|standing against|standing around|
standing behind|standing beside|standing in front of|standing near|standing next to|staring at|stuck in|
surrounding|swimming in|swinging|talking to|topped with|touching|traveling down|traveling on|tying|typing on|
underneath|wading in|waiting for|walking across|walking by|walking down|walking next to|walking through|
working in|working on|worn on|wrapped around|wrapped in|by|of|near|next to|with|beside|on the side of|around"""
                                                   .replace("\n", "").split("|"))


def _read_list(path: Path, fields: tuple[str, ...], what: str) -> tuple[list[dict], int]:
    """The JSON list at path: (entries having every field, number of malformed entries); ValueError when the file
    is not JSON, not a list (a SugarCrepe file is an object), or no entry has the fields."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(raw, list):
        first = next(iter(raw.values()), None) if isinstance(raw, dict) else None
        hint = (f" whose entries have {', '.join(sorted(first))}" if isinstance(first, dict) else "")
        hint += " (a SugarCrepe file?)" if isinstance(first, dict) and "negative_caption" in first else ""
        raise ValueError(f"{path} is not an ARO {what} file: expected a JSON list of entries with "
                         f"{', '.join(fields)}; got a JSON {type(raw).__name__}{hint}")
    if not raw:
        raise ValueError(f"{path} holds no example")
    good = [e for e in raw if isinstance(e, dict) and all(f in e for f in fields)]
    if not good:
        sample = raw[0]
        have = ", ".join(sorted(sample)) if isinstance(sample, dict) else type(sample).__name__
        raise ValueError(f"{path} is not an ARO {what} file: no entry has all of {', '.join(fields)} "
                         f"(the first has {have})")
    return good, len(raw) - len(good)


def _open_image(path: Path, box: tuple | None, preprocess: Callable) -> torch.Tensor | None:
    try:
        with Image.open(path) as img:
            rgb = img.convert("RGB")
            if box is not None:
                rgb = rgb.crop(box)  # the benchmark's crop: PIL rounds the box to whole pixels
            return preprocess(rgb)
    except (FileNotFoundError, IsADirectoryError, UnidentifiedImageError, OSError, ValueError):
        return None


def _images(keys: list[tuple[str, tuple | None]], preprocess: Callable,
            loaded: list[int], desc: str, progress: bool, shard: Shard | None) -> Iterator[torch.Tensor]:
    for i, key in enumerate(tqdm(keys, desc=desc, disable=not progress)):
        if shard is not None and not shard.mine(i):
            continue
        tensor = _open_image(Path(key[0]), key[1], preprocess)
        if tensor is None:
            continue
        loaded.append(i)
        yield tensor


def _score(model, preprocess: Callable, tokenizer: Callable, examples: list[tuple[tuple, list[str]]], *,
           device, batch_size: int, progress: bool, desc: str, shard: Shard | None
           ) -> tuple[list[torch.Tensor | None], int, int]:
    """Cosine scores of each example's options against its image: ([(num_options,) or None when the image is
    missing], number of unique images, number of those missing)."""
    keys = sorted({key for key, _ in examples}, key=repr)
    loaded: list[int] = []
    with eval_mode(model):
        image_features = encode_images(
            model, _images(keys, preprocess, loaded, f"{desc} images", progress, shard), batch_size,
            device=device)  # (num_loaded, D)
        loaded, image_features, _ = gather_rows(loaded, image_features, [None] * len(loaded), shard)
        index = {keys[j]: i for i, j in enumerate(loaded)}
        texts = sorted({t for key, options in examples if key in index for t in options})
        text_features = encode_texts(model, tokenizer, texts, device=device, batch_size=batch_size,
                                     progress=progress, desc=f"{desc} texts", shard=shard)  # (num_texts, D)
    text_index = {t: i for i, t in enumerate(texts)}
    scores: list[torch.Tensor | None] = []
    for key, options in examples:
        if key not in index:
            scores.append(None)
            continue
        # The same row-times-rows product for every option, so identical texts tie exactly.
        opts = text_features[torch.tensor([text_index[t] for t in options])]  # (num_options, D)
        scores.append((opts * image_features[index[key]]).sum(-1))
    return scores, len(keys), len(keys) - len(loaded)


def _check_files(examples: list[tuple[tuple, list[str]]], what: str, strict: bool, max_missing_share: float,
                 where: Path) -> None:
    """Strict mode: fail on absent image files before anything is encoded (unreadable ones are caught after)."""
    paths = {key[0] for key, _ in examples}
    absent = sum(not os.path.isfile(p) for p in paths)
    check_missing_share(what, absent, len(paths), strict, max_missing_share, str(where))


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _evaluate_vg(subset: str, path: Path, image_dir: Path, model, preprocess, tokenizer, *, device, batch_size,
                 progress, strict, max_missing_share, shard) -> dict:
    what = "VG-Relation" if subset == "vg_relation" else "VG-Attribution"
    group_field = "relation_name" if subset == "vg_relation" else "attributes"
    entries, malformed = _read_list(path, VG_FIELDS + (group_field,), what)
    boxed = [e for e in entries if all(isinstance(e[k], (int, float)) and not isinstance(e[k], bool)
                                       for k in ("bbox_x", "bbox_y", "bbox_w", "bbox_h"))]
    malformed += len(entries) - len(boxed)
    entries = boxed
    if not entries:
        raise ValueError(f"{path}: no entry has a numeric bbox_x, bbox_y, bbox_w, bbox_h")
    examples, groups = [], []
    for e in entries:
        box = (e["bbox_x"], e["bbox_y"], e["bbox_x"] + e["bbox_w"], e["bbox_y"] + e["bbox_h"])
        examples.append(((str(image_dir / e["image_path"]), box), [e["true_caption"], e["false_caption"]]))
        g = e[group_field]
        groups.append("_".join(map(str, g)) if isinstance(g, (list, tuple)) else str(g))
    _check_files(examples, f"ARO {what} ({path})", strict, max_missing_share, image_dir)
    scores, num_images, num_missing = _score(model, preprocess, tokenizer, examples, device=device,
                                             batch_size=batch_size, progress=progress, desc=subset, shard=shard)
    check_missing_share(f"ARO {what} ({path})", num_missing, num_images, strict, max_missing_share,
                        str(image_dir))
    correct: dict[str, list[bool]] = defaultdict(list)
    for g, s in zip(groups, scores):
        if s is not None:
            correct[g].append(bool(s[0] > s[1]))
    evaluated = sum(len(v) for v in correct.values())
    if not evaluated:
        raise ValueError(f"ARO {what} ({path}): no example could be evaluated; images missing under {image_dir}")
    per_group = {g: {"accuracy": sum(v) / len(v), "count": len(v)} for g, v in sorted(correct.items())}
    if subset == "vg_relation":
        kept = [r["accuracy"] for g, r in per_group.items() if g not in SYMMETRIC_RELATIONS]
        extra = {"per_relation": per_group, "num_relations_in_macro": len(kept)}
    else:
        kept = [r["accuracy"] for r in per_group.values() if r["count"] >= MIN_ATTRIBUTE_PAIR_COUNT]
        extra = {"per_attribute_pair": per_group, "num_pairs_in_macro": len(kept)}
    notes = []
    if not kept:
        wanted = ("non-symmetric relation" if subset == "vg_relation"
                  else f"attribute pair with >= {MIN_ATTRIBUTE_PAIR_COUNT} examples")
        notes.append(f"{what}: no {wanted}; macro_accuracy is None")
    return {"macro_accuracy": _mean(kept), "micro_accuracy": sum(sum(v) for v in correct.values()) / evaluated,
            **extra, "num_examples": len(entries) + malformed, "num_evaluated": evaluated,
            "num_missing_images": sum(s is None for s in scores), "num_malformed": malformed, "notes": notes}


def _evaluate_order(subset: str, path: Path, image_root: Path, perturber: OrderPerturber, model, preprocess,
                    tokenizer, *, device, batch_size, progress, strict, max_missing_share, shard) -> dict:
    what = "COCO-Order" if subset == "coco_order" else "Flickr30k-Order"
    entries, malformed = _read_list(path, ORDER_FIELDS, what)
    captions, streams, keys = [], [], []
    for i, e in enumerate(entries):
        caps = e["caption"] if isinstance(e["caption"], list) else [e["caption"]]
        for j, c in enumerate(caps):
            if isinstance(c, str):
                captions.append(c)
                streams.append(f"{subset}/{i}/{j}")
                keys.append((str(image_root / e["image"]), None))
    if not captions:
        raise ValueError(f"{path} holds no caption")
    _check_files([(k, []) for k in keys], f"ARO {what} ({path})", strict, max_missing_share, image_root)
    options = perturber.options_many(captions, streams)
    examples = [(key, opts) for key, opts in zip(keys, options)]
    scores, num_images, num_missing = _score(model, preprocess, tokenizer, examples, device=device,
                                             batch_size=batch_size, progress=progress, desc=subset, shard=shard)
    check_missing_share(f"ARO {what} ({path})", num_missing, num_images, strict, max_missing_share,
                        str(image_root))
    num_correct = num_evaluated = num_trivial = 0
    for opts, s in zip(options, scores):
        if s is None:
            continue
        distinct = [k for k in range(1, len(opts)) if opts[k] != opts[0]]
        if not distinct:
            num_trivial += 1
            continue
        num_evaluated += 1
        num_correct += bool(s[0] > s[distinct].max())
    if not num_evaluated:
        raise ValueError(f"ARO {what} ({path}): no example could be evaluated (images under {image_root})")
    return {"accuracy": num_correct / num_evaluated, "num_examples": len(captions), "num_evaluated": num_evaluated,
            "num_correct": num_correct, "num_no_distinct_option": num_trivial,
            "num_missing_images": sum(s is None for s in scores), "num_malformed": malformed, "notes": []}


def evaluate(model, preprocess: Callable, tokenizer: Callable, data_dir: str | os.PathLike, *,
             coco_root: str | os.PathLike | None = None, flickr_root: str | os.PathLike | None = None,
             device: str | torch.device = "cpu", batch_size: int = 64, progress: bool = False, seed: int = 0,
             strict: bool = True, max_missing_share: float = 0.0, spacy_model: str = "en_core_web_sm",
             shard: Shard | None = None) -> dict:
    """Every ARO subset present under data_dir (see the module docstring); {subset: {...}, "average": mean of
    the subsets' headline accuracies, "missing_subsets": [...], "notes": [...]}."""
    _check_batch_size(batch_size)
    root = Path(data_dir)
    if not root.is_dir():
        raise ValueError(f"ARO directory not found: {root}")
    present = {s: root / f for s, f in SUBSET_FILES.items() if (root / f).is_file()}
    if not present:
        raise ValueError(f"no ARO file ({', '.join(SUBSET_FILES.values())}) in {root}: it is {describe_kind(root)}")
    common = dict(device=device, batch_size=batch_size, progress=progress, strict=strict,
                  max_missing_share=max_missing_share, shard=shard)
    result: dict = {}
    perturber = OrderPerturber(seed=seed, spacy_model=spacy_model)
    for subset, path in present.items():
        if subset.startswith("vg_"):
            result[subset] = _evaluate_vg(subset, path, root / "images", model, preprocess, tokenizer, **common)
        else:
            given = coco_root if subset == "coco_order" else flickr_root
            image_root = Path(given) if given else root
            result[subset] = _evaluate_order(subset, path, image_root, perturber, model, preprocess, tokenizer,
                                             **common)
    headline = [result[s].get("macro_accuracy", result[s].get("accuracy")) for s in present]
    result["average"] = _mean([h for h in headline if h is not None])
    result["missing_subsets"] = [s for s in SUBSET_FILES if s not in present]
    result["notes"] = [f"subset {s} skipped: no {SUBSET_FILES[s]} in {root}" for s in result["missing_subsets"]]
    return result


__all__ = ["evaluate", "SUBSET_FILES", "SYMMETRIC_RELATIONS", "MIN_ATTRIBUTE_PAIR_COUNT"]
