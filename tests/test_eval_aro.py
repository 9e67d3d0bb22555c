"""ARO: VG-Relation, VG-Attribution, COCO-Order, Flickr30k-Order against hand-computed cases and the official rules.

Hand cases use the table model of test_eval: an image's id is the red value of its top-left pixel *after the
crop*, and everything outside the boxes has id 250, whose feature vector reverses every answer; so a missing or
wrong crop changes the metric. The synthetic world is checked against the benchmark's one-example-at-a-time loop.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clove_dist.cli import main as cli_main
from clove_dist.data.synthetic import write_world
from clove_dist.eval import aro
from clove_dist.eval.aro_order import OrderPerturber, pre_caption
from test_eval import TableModel, TableTokenizer, id_preprocess, tiny_clip  # noqa: F401 (fixture)

OUTSIDE = 250  # id of every pixel outside the boxes
DIM = 4


def _canvas(path: Path, boxes: dict[int, tuple[int, int, int, int]]) -> None:
    """A PNG (under a .jpg name, as the VG files are named) with each box filled with its id."""
    img = Image.new("RGB", (256, 256), (OUTSIDE, 0, 0))
    for i, (x, y, w, h) in boxes.items():
        img.paste((i, 0, 0), (x, y, x + w, y + h))
    img.save(path, format="PNG")


class _VGCase:
    """Builds VG entries whose outcome is chosen: 'right', 'wrong' or 'tie' for the true vs the false caption."""

    def __init__(self, root: Path):
        self.root = root
        (root / "images").mkdir(parents=True, exist_ok=True)
        self.image_vecs = np.tile(np.eye(DIM)[1], (256, 1))
        self.image_vecs[OUTSIDE] = -np.eye(DIM)[0]  # uncropped: every "right" example becomes wrong
        self.texts: dict[str, np.ndarray] = {}
        self.boxes: dict[int, tuple[int, int, int, int]] = {}

    def entry(self, outcome: str, **fields) -> dict:
        i = len(self.boxes)
        box = ((i % 16) * 16, (i // 16) * 16, 8, 8)
        self.boxes[i] = box
        v = np.eye(DIM)[0] + 0.1 * np.eye(DIM)[2 + i % 2]
        self.image_vecs[i] = v
        true, false = f"true {i}", f"false {i}"
        good, bad = v, -v + 0.5 * np.eye(DIM)[3]
        self.texts[true], self.texts[false] = {"right": (good, bad), "wrong": (bad, good), "tie": (good, good)}[outcome]
        return {"image_id": str(i), "image_path": "canvas.jpg", "bbox_x": box[0], "bbox_y": box[1], "bbox_w": box[2],
                "bbox_h": box[3], "true_caption": true, "false_caption": false, **fields}

    def model(self):
        _canvas(self.root / "images" / "canvas.jpg", self.boxes)
        names = list(self.texts)
        return TableModel(self.image_vecs, np.stack([self.texts[n] for n in names])), TableTokenizer(names)


def test_vg_relation_macro_excludes_symmetric_relations_and_crops(tmp_path):
    case = _VGCase(tmp_path)
    outcomes = {"on": ["right", "right", "wrong"], "above": ["right", "wrong", "tie"], "next to": ["wrong", "wrong"]}
    entries = [case.entry(o, relation_name=r) for r, os_ in outcomes.items() for o in os_]
    (tmp_path / "visual_genome_relation.json").write_text(json.dumps(entries))
    model, tok = case.model()
    res = aro.evaluate(model, id_preprocess, tok, tmp_path, batch_size=3)
    vgr = res["vg_relation"]
    assert "next to" in aro.SYMMETRIC_RELATIONS and "on" not in aro.SYMMETRIC_RELATIONS
    # on 2/3, above 1/3 (a tie goes to the false caption, as the benchmark's argmax does); next to is excluded.
    assert vgr["per_relation"]["on"]["accuracy"] == pytest.approx(2 / 3)
    assert vgr["per_relation"]["above"]["accuracy"] == pytest.approx(1 / 3)
    assert vgr["per_relation"]["next to"] == {"accuracy": 0.0, "count": 2}
    assert vgr["macro_accuracy"] == pytest.approx(0.5) and vgr["num_relations_in_macro"] == 2
    assert vgr["micro_accuracy"] == pytest.approx(3 / 8)
    assert res["average"] == pytest.approx(0.5)
    assert res["missing_subsets"] == ["vg_attribution", "coco_order", "flickr30k_order"]
    # Without the crop every image would be id 250, whose vector makes all "right" answers wrong.
    assert vgr["per_relation"]["on"]["accuracy"] > 0


def test_vg_attribution_macro_over_pairs_with_25_examples(tmp_path):
    case = _VGCase(tmp_path)
    entries = [case.entry("right" if k < 20 else "wrong", attributes=["red", "blue"]) for k in range(25)]
    entries += [case.entry("wrong", attributes=["big", "small"]) for _ in range(24)]
    (tmp_path / "visual_genome_attribution.json").write_text(json.dumps(entries))
    model, tok = case.model()
    vga = aro.evaluate(model, id_preprocess, tok, tmp_path, batch_size=16)["vg_attribution"]
    assert vga["per_attribute_pair"]["red_blue"] == {"accuracy": 0.8, "count": 25}
    assert vga["per_attribute_pair"]["big_small"]["count"] == 24  # one short of the floor: not in the macro
    assert vga["macro_accuracy"] == pytest.approx(0.8) and vga["num_pairs_in_macro"] == 1
    assert vga["micro_accuracy"] == pytest.approx(20 / 49)


def test_order_perturbations_follow_the_benchmark():
    p = OrderPerturber(seed=3)
    # No final period here: "." is an "other" token that perturbation 2 moves and pre_caption then deletes, which
    # would shift the word positions checked below (the benchmark does the same).
    caption = "A man riding a brown horse on the Beach"  # a capitalised noun is still a noun (NNP)
    options = p.options(caption, "coco/0/0")
    assert options == p.options(caption, "coco/0/0") and options != p.options(caption, "coco/0/1")
    assert options != OrderPerturber(seed=4).options(caption, "coco/0/0")
    true = options[0]
    assert true == "a man riding a brown horse on the beach" == pre_caption(caption)
    for perturbed in options[1:]:
        assert sorted(perturbed.split()) == sorted(true.split())  # the same words, reordered
    words = true.split()
    nouns, adjs = {"man", "horse", "beach"}, {"brown"}  # spaCy's tags: NN, NN, NNP, JJ
    p1, p2 = options[1].split(), options[2].split()
    # 1: nouns only move among noun positions, adjectives among adjective positions; other words stay.
    assert all((a in nouns) == (b in nouns) for a, b in zip(words, p1))
    assert all(a == b for a, b in zip(words, p1) if a not in nouns | adjs)
    # 2: nouns and adjectives stay where they were.
    assert all(a == b for a, b in zip(words, p2) if a in nouns | adjs)
    # 3: each trigram keeps its words; 4: trigrams move as units.
    tokens = ["a", "man", "riding", "a", "brown", "horse", "on", "the", "beach"]  # lower-cased
    p3 = options[3].split()
    assert all(sorted(p3[i:i + 3]) == sorted(tokens[i:i + 3]) for i in range(0, 9, 3))
    p4 = options[4].split()
    assert sorted(tuple(p4[i:i + 3]) for i in range(0, 9, 3)) == sorted(tuple(tokens[i:i + 3]) for i in (0, 3, 6))
    assert pre_caption("Hello!  (World) " + " w" * 40).split() == (["hello", "world"] + ["w"] * 40)[:30]


def _order_case(root: Path, captions: list[tuple[str, str]], folder: str, fname: str):
    """Each (caption, outcome): outcome 'right' puts every distinct perturbation below the caption, 'wrong' puts
    one above it. Returns (model, tokenizer, expected per-caption correctness or None when trivial)."""
    (root / folder).mkdir(parents=True, exist_ok=True)
    perturber = OrderPerturber(seed=0)
    subset = "coco_order" if fname.startswith("coco") else "flickr30k_order"
    entries, texts, image_vecs = [], {}, np.zeros((256, DIM))
    for i, (caption, outcome) in enumerate(captions):
        Image.new("RGB", (4, 4), (i, 0, 0)).save(root / folder / f"{i}.jpg", format="PNG")
        entries.append({"image": f"{folder}/{i}.jpg", "caption": [caption]})
        v = np.eye(DIM)[0] + 0.3 * np.eye(DIM)[1 + i % 3]
        image_vecs[i] = v
        options = perturber.options(caption, f"{subset}/{i}/0")
        texts[options[0]] = v + 0.2 * np.eye(DIM)[3]  # the caption: cosine < 1
        for k, o in enumerate(o for o in options[1:] if o != options[0]):
            texts[o] = v if (outcome == "wrong" and k == 0) else -v + np.eye(DIM)[3]
    (root / fname).write_text(json.dumps(entries))
    names = list(texts)
    return TableModel(image_vecs, np.stack([texts[n] for n in names])), TableTokenizer(names)


def test_order_micro_accuracy_and_identical_perturbations(tmp_path):
    captions = [("A man riding a brown horse on the beach.", "right"),
                ("Two dogs play with a red ball in the park.", "wrong"),
                ("A cat sleeping on a warm wooden chair.", "right"),
                ("red dog", "right"),  # three of four perturbations equal the caption: not distinct options
                ("dog", "right")]  # every perturbation equals the caption: no distinct option, left out
    model, tok = _order_case(tmp_path, captions, "val2014", "coco_karpathy_test.json")
    res = aro.evaluate(model, id_preprocess, tok, tmp_path)["coco_order"]
    opts = OrderPerturber(seed=0).options("red dog", "coco_order/3/0")
    assert 1 <= sum(o == opts[0] for o in opts[1:]) < 4, "the case needs identical and distinct perturbations"
    # The identical options tie with the caption; a rule counting them as options would mark "red dog" wrong.
    assert (res["num_examples"], res["num_evaluated"], res["num_no_distinct_option"]) == (5, 4, 1)
    assert res["num_correct"] == 3 and res["accuracy"] == pytest.approx(3 / 4)


def test_flickr_order_reads_its_own_file_and_image_root(tmp_path):
    captions = [("A man riding a brown horse on the beach.", "right"), ("Two dogs play with a red ball.", "wrong")]
    model, tok = _order_case(tmp_path / "flickr", captions, "flickr30k-images", "flickr30k_test.json")
    (tmp_path / "aro").mkdir()
    (tmp_path / "flickr" / "flickr30k_test.json").rename(tmp_path / "aro" / "flickr30k_test.json")
    with pytest.raises(ValueError, match=r"2 of 2 images missing"):
        aro.evaluate(model, id_preprocess, tok, tmp_path / "aro")
    res = aro.evaluate(model, id_preprocess, tok, tmp_path / "aro", flickr_root=tmp_path / "flickr")
    assert res["flickr30k_order"]["accuracy"] == 0.5 and list(res)[0] == "flickr30k_order"


def test_bad_input_is_one_line_naming_the_file(tmp_path):
    model, tok = TableModel(np.eye(2), np.eye(2)), TableTokenizer(["a", "b"])
    with pytest.raises(ValueError, match="ARO directory not found"):
        aro.evaluate(model, id_preprocess, tok, tmp_path / "nowhere")
    (tmp_path / "sc").mkdir()
    (tmp_path / "sc" / "replace_obj.json").write_text("{}")
    with pytest.raises(ValueError, match=r"no ARO file .* it is a SugarCrepe set"):
        aro.evaluate(model, id_preprocess, tok, tmp_path / "sc")
    # A SugarCrepe file saved under an ARO name.
    vgr = tmp_path / "x" / "visual_genome_relation.json"
    vgr.parent.mkdir()
    vgr.write_text(json.dumps({"0": {"filename": "a.jpg", "caption": "a", "negative_caption": "b"}}))
    with pytest.raises(ValueError, match=r"visual_genome_relation.json is not an ARO VG-Relation file.*SugarCrepe"):
        aro.evaluate(model, id_preprocess, tok, tmp_path / "x")
    vgr.write_text(json.dumps([{"image": "a.jpg", "caption": ["x"]}]))  # a COCO-Order entry
    with pytest.raises(ValueError, match=r"no entry has all of image_path.*the first has caption, image"):
        aro.evaluate(model, id_preprocess, tok, tmp_path / "x")
    good = {"image_path": "a.jpg", "bbox_x": 0, "bbox_y": 0, "bbox_w": 1, "bbox_h": 1, "true_caption": "a",
            "false_caption": "b", "relation_name": "on"}
    vgr.write_text(json.dumps([good | {"bbox_x": "12"}]))
    with pytest.raises(ValueError, match="no entry has a numeric bbox_x"):
        aro.evaluate(model, id_preprocess, tok, tmp_path / "x")
    vgr.write_text("[]")
    with pytest.raises(ValueError, match="holds no example"):
        aro.evaluate(model, id_preprocess, tok, tmp_path / "x")
    vgr.write_text("[1,")
    with pytest.raises(ValueError, match="is not valid JSON"):
        aro.evaluate(model, id_preprocess, tok, tmp_path / "x")


# ------------------------------------------------------------------------------------ synthetic world, open_clip

@pytest.fixture(scope="module")
def aro_world(tmp_path_factory):
    # 12 examples per subset keep the test fast; the world's four attribute pairs then have 3 examples each, under
    # VG-Attribution's 25-example floor, so its macro is checked by the hand case above and here pair by pair.
    return write_world(tmp_path_factory.mktemp("aroworld"), seed=2, num_train=1, samples_per_shard=20,
                       num_eval_per_subset=1, num_zeroshot_per_class=1, num_retrieval_images=1,
                       num_aro_per_subset=12, image_size=64, progress=False)


def test_synthetic_world_aro_matches_the_official_loop(tiny_clip, aro_world):
    model, preprocess, tokenizer = tiny_clip
    root = Path(aro_world.aro_dir)
    res = aro.evaluate(model, preprocess, tokenizer, root, batch_size=5)
    with torch.no_grad():
        def score(image: Image.Image, texts: list[str]) -> torch.Tensor:
            img = model.encode_image(preprocess(image).unsqueeze(0), normalize=True)
            return (model.encode_text(tokenizer(texts), normalize=True) @ img.T).squeeze(1)

        for subset, fname, group in (("vg_relation", "visual_genome_relation.json", "relation_name"),
                                     ("vg_attribution", "visual_genome_attribution.json", "attributes")):
            per: dict[str, list[bool]] = {}
            for e in json.loads((root / fname).read_text()):
                image = Image.open(root / "images" / e["image_path"]).convert("RGB")
                image = image.crop((e["bbox_x"], e["bbox_y"], e["bbox_x"] + e["bbox_w"], e["bbox_y"] + e["bbox_h"]))
                s = score(image, [e["false_caption"], e["true_caption"]])
                # 1e-5: batched and single fp32 encodes differ by ~1e-6; a closer call could flip.
                assert abs(float(s[1] - s[0])) > 1e-5
                key = "_".join(e[group]) if isinstance(e[group], list) else e[group]
                per.setdefault(key, []).append(int(s.argmax()) == 1)  # the benchmark's argmax over [false, true]
            got = res[subset]["per_relation" if subset == "vg_relation" else "per_attribute_pair"]
            assert {k: v["accuracy"] for k, v in got.items()} == pytest.approx({k: sum(v) / len(v)
                                                                                for k, v in per.items()})
            if subset == "vg_relation":
                kept = [sum(v) / len(v) for k, v in per.items() if k not in aro.SYMMETRIC_RELATIONS]
                assert res[subset]["macro_accuracy"] == pytest.approx(sum(kept) / len(kept))
        perturber = OrderPerturber(seed=0)
        for subset, fname in (("coco_order", "coco_karpathy_test.json"), ("flickr30k_order", "flickr30k_test.json")):
            correct = total = both_rules = 0
            for i, e in enumerate(json.loads((root / fname).read_text())):
                image = Image.open(root / e["image"]).convert("RGB")
                for j, caption in enumerate(e["caption"]):
                    options = perturber.options(caption, f"{subset}/{i}/{j}")
                    s = score(image, options)
                    distinct = [k for k in range(1, 5) if options[k] != options[0]]
                    assert distinct, "synthetic captions are long enough for a distinct perturbation"
                    gap = float(s[0] - s[distinct].max())
                    assert abs(gap) > 1e-5  # as above
                    if len(set(options)) == 5:
                        correct += int(s.argmax()) == 0  # the benchmark's argmax over the five options
                        both_rules += 1
                    else:  # an identical perturbation ties with the caption: it is not a distinct option
                        correct += gap > 0
                    total += 1
            assert res[subset]["num_evaluated"] == total and both_rules > total // 2
            assert res[subset]["accuracy"] == pytest.approx(correct / total)


def test_cli_eval_aro(tmp_path, aro_world, capsys):
    out = tmp_path / "aro.json"
    assert cli_main(["eval", "--model", "clove-micro", "--device", "cpu", "--aro", aro_world.aro_dir,
                     "--out", str(out)]) == 0
    res = json.loads(out.read_text())["aro"]
    assert set(res) >= {"vg_relation", "vg_attribution", "coco_order", "flickr30k_order", "average"}
    capsys.readouterr()
    (Path(aro_world.aro_dir) / "val2014").rename(Path(tmp_path) / "moved")
    try:
        rc = cli_main(["eval", "--model", "clove-micro", "--device", "cpu", "--aro", aro_world.aro_dir])
        err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bars
        assert rc == 2 and err.startswith("error: ") and "coco_karpathy_test.json" in err and "12 of 12 images" in err
        assert cli_main(["eval", "--model", "clove-micro", "--device", "cpu", "--aro", aro_world.aro_dir,
                         "--aro-coco-root", str(tmp_path / "nowhere"), "--no-strict"]) == 2  # nothing left to score
    finally:
        (Path(tmp_path) / "moved").rename(Path(aro_world.aro_dir) / "val2014")


def test_cli_names_the_kind_of_set_given_to_the_wrong_flag(aro_world, tmp_path, capsys):
    rc = cli_main(["eval", "--model", "clove-micro", "--device", "cpu", "--sugarcrepe", aro_world.aro_dir])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and "no SugarCrepe subset file" in err and "an ARO set" in err
    rc = cli_main(["eval", "--model", "clove-micro", "--device", "cpu", "--aro", aro_world.sugarcrepe_dir])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and "no ARO file" in err and "a SugarCrepe set" in err
    (tmp_path / "empty").mkdir()
    rc = cli_main(["eval", "--model", "clove-micro", "--device", "cpu", "--aro", str(tmp_path / "empty")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and "not an evaluation set" in err
