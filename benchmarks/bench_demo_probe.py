"""Where the demo's compositional gain stops: held-out against seen compositions, and which way round.

    clove-dist demo --out /tmp/demo
    python benchmarks/bench_demo_probe.py --demo-out /tmp/demo        # writes results/demo_probe.{csv,md}

For the base (alpha 0), CLoVe (alpha 0.6) and the fine-tuned model (alpha 1) of a finished demo (its
patched_alpha*.safetensors), three measurements:

1. SugarCrepe-format accuracy per subset on the world's set (held-out compositions) and on a second set of the
   same size written here from the same seed, on compositions training shows but in captions it does not
   (synthetic.write_sugarcrepe(held_out=False), checked against every caption of the demo's shards). Both go
   through the project's SugarCrepe evaluator. The gap between the two is what the held-out pairs cost.
2. Which way round: a linear probe on each tower's frozen, normalised features predicts the colour of the left
   (or upper) object of a two-object scene, from the image or from its caption. Knowing the scene's two colours
   but not where each is gives 50%; a tower that encodes the arrangement gives up to 100%.
3. How far apart the text tower puts a caption and its negative: mean cosine of the two text embeddings per
   subset (1.0: the text tower cannot tell them apart, whatever the image).
4. Whether the base towers can learn which way round at all: each tower of the base, all its weights and a linear
   head, trained on the probe's label for --learn-steps steps (AdamW, lr 1e-3, batch 64, the demo's own rate),
   then tested on the probe's test scenes. High accuracy here and chance in (2) after fine-tuning says the
   capacity is there and the contrastive signal does not reach it.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tarfile
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record import RESULTS_DIR, append_csv, context_header, machine_context, markdown_table  # noqa: E402

from clove_dist.data.synthetic import COLOURS  # noqa: E402

MODELS = (("base (alpha 0)", "0"), ("CLoVe (alpha 0.6)", "0.6"), ("fine-tuned (alpha 1)", "1"))
# Both sets have these (the seen set has no add_obj: see synthetic.write_sugarcrepe); "average" is their mean.
TWO_OBJECT_SUBSETS = ("replace_obj", "replace_att", "replace_rel", "swap_obj", "swap_att", "add_att")


def training_captions(world: Path) -> set[str]:
    """Every caption (alt-text and clean caption) of the world's pre-training and fine-tuning shards."""
    captions: set[str] = set()
    for tar_path in sorted(world.glob("pretrain/*.tar")) + sorted(world.glob("train/*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar:
                f = tar.extractfile(member) if member.isfile() else None
                if f is None:
                    continue
                if member.name.endswith(".txt"):
                    captions.add(f.read().decode("utf-8"))
                elif member.name.endswith(".json"):
                    meta = json.loads(f.read())
                    captions.update(c for c in [meta.get("top_caption")] if c)
    return captions


def first_colour(scene) -> str:
    """The colour of the left (horizontal relation) or upper (vertical relation) object."""
    a, b = scene.objects
    return (a if scene.relation in ("to the left of", "above") else b).colour


def probe_scenes(preprocess, tokenizer, seed: int, image_size: int, num_train: int, num_test: int) -> dict:
    """{split: {"image": preprocessed images, "text": tokens, "labels": first_colour indices}} of two-object
    scenes of the fine-tuning vocabulary, none with a held-out composition."""
    import torch
    from clove_dist.data import synthetic as S
    colours = list(COLOURS)
    data = {}
    for split, count in (("train", num_train), ("test", num_test)):
        rng = random.Random(f"demo-probe/{seed}/{split}")
        scenes = [S.sample_scene(rng, 2, exclude_held_out=True) for _ in range(count)]
        data[split] = {"image": torch.stack([preprocess(S.render(s, image_size)) for s in scenes]),
                       "text": tokenizer([S.caption(s) for s in scenes]),
                       "labels": torch.tensor([colours.index(first_colour(s)) for s in scenes])}
    return data


def _encode(model, tower: str, inputs):
    import torch
    with torch.no_grad():  # a chunk at a time: a demo --config may name a 224 px model
        encode = model.encode_image if tower == "image" else model.encode_text
        return torch.cat([encode(inputs[i:i + 256], normalize=True) for i in range(0, len(inputs), 256)])


def direction_probe(model, scenes: dict, seed: int) -> dict[str, float]:
    """Test accuracy (%) of a linear probe on frozen image and text features for first_colour."""
    import torch
    data = {split: {tower: _encode(model, tower, d[tower]) for tower in ("image", "text")} | {"labels": d["labels"]}
            for split, d in scenes.items()}
    out = {}
    for tower in ("image", "text"):
        torch.manual_seed(seed)
        x, y = data["train"][tower], data["train"]["labels"]
        head = torch.nn.Linear(x.shape[1], len(COLOURS))
        opt = torch.optim.Adam(head.parameters(), lr=1e-2)
        for _ in range(500):  # full batch; the unit-norm features are scaled so the probe needs no large weights
            loss = torch.nn.functional.cross_entropy(head(10 * x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            hit = head(10 * data["test"][tower]).argmax(-1) == data["test"]["labels"]
        out[tower] = 100 * hit.float().mean().item()
    return out


def direction_learned(model, scenes: dict, seed: int, steps: int) -> dict[str, float]:
    """Test accuracy (%) for first_colour of each tower of `model` trained, whole, with a linear head, for `steps`
    steps; `model` is left as it was (each tower trains on a copy)."""
    import copy
    import torch
    out = {}
    for tower in ("image", "text"):
        torch.manual_seed(seed)
        trained = copy.deepcopy(model)
        encode = trained.encode_image if tower == "image" else trained.encode_text
        params = [p for n, p in trained.named_parameters() if n.startswith("visual.") == (tower == "image")]
        head = torch.nn.Linear(trained.text_projection.shape[1], len(COLOURS))
        opt = torch.optim.AdamW(params + list(head.parameters()), lr=1e-3)
        x, y = scenes["train"][tower], scenes["train"]["labels"]
        trained.train()
        for _ in range(steps):
            batch = torch.randint(0, len(y), (64,))
            loss = torch.nn.functional.cross_entropy(head(10 * encode(x[batch], normalize=True)), y[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
        trained.eval()
        with torch.no_grad():
            hit = head(10 * _encode(trained, tower, scenes["test"][tower])).argmax(-1) == scenes["test"]["labels"]
        out[tower] = 100 * hit.float().mean().item()
    return out


def relation_split(data_dir: Path, scores: dict[str, list[float]]) -> dict[str, float]:
    """replace_rel accuracy (%) apart for negatives that name the opposite direction ("left of" -> "right of",
    "above" -> "below": which object is where) and those on the other axis ("left of" -> "above")."""
    from clove_dist.data.synthetic import _INVERSE as opposite, RELATIONS

    def relation(caption: str) -> str:
        return next(r for r in RELATIONS if f" {r} " in caption)

    rows = list(json.loads((data_dir / "replace_rel.json").read_text()).values())
    hits: dict[str, list[bool]] = {"opposite": [], "other axis": []}
    for row, pos, neg in zip(rows, scores["positive"], scores["negative"]):
        kind = "opposite" if opposite[relation(row["caption"])] == relation(row["negative_caption"]) else "other axis"
        hits[kind].append(pos > neg)
    return {k: 100 * sum(v) / len(v) if v else None for k, v in hits.items()}  # None: no such negative in the set


def text_cosines(model, tokenizer, data_dir: Path) -> dict[str, float]:
    """Mean cosine between the text embeddings of each example's caption and negative caption, per subset."""
    import torch
    out = {}
    for subset in TWO_OBJECT_SUBSETS:
        rows = list(json.loads((data_dir / f"{subset}.json").read_text()).values())
        with torch.no_grad():
            pos = model.encode_text(tokenizer([r["caption"] for r in rows]), normalize=True)
            neg = model.encode_text(tokenizer([r["negative_caption"] for r in rows]), normalize=True)
        out[subset] = (pos * neg).sum(-1).mean().item()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--demo-out", required=True, help="a finished `clove-dist demo --out` directory")
    ap.add_argument("--probe-train", type=int, default=3000, help="scenes the direction probe trains on")
    ap.add_argument("--probe-test", type=int, default=1000, help="scenes it is tested on")
    ap.add_argument("--learn-steps", type=int, default=100,
                    help="steps each base tower trains on the direction label (measurement 4)")
    ap.add_argument("--name", default="demo_probe", help="results/<name>.{csv,md}")
    args = ap.parse_args(argv)

    import open_clip
    import torch
    import yaml
    from clove_dist.data.synthetic import write_sugarcrepe
    from clove_dist.eval.sugarcrepe import evaluate
    from clove_dist.model import model_config

    torch.set_num_threads(min(2, torch.get_num_threads()))
    demo = Path(args.demo_out).resolve()
    world_args = json.loads((demo / "world" / "world.json").read_text())
    seed, size, num = world_args["seed"], world_args["image_size"], world_args["num_eval_per_subset"]
    name = yaml.safe_load((demo / "runs" / "clove" / "config.yaml").read_text())["model"]["name"]
    model_config(name)  # registers the project's model configs with open_clip
    tokenizer = open_clip.get_tokenizer(name)
    ctx = machine_context("cpu")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        sets = {"held-out": demo / "world" / "sugarcrepe"}
        try:
            sets["seen"] = Path(write_sugarcrepe(Path(tmp) / "sugarcrepe_seen", seed, num, size,
                                                 training_captions(demo / "world"), held_out=False))
        except ValueError as e:  # training covers the seen compositions' captions: measure the rest without it
            print(f"bench_demo_probe: {e}; the seen-composition set is left out", file=sys.stderr)
        scenes = None
        for label, alpha in MODELS:
            model, _, preprocess = open_clip.create_model_and_transforms(
                name, pretrained=str(demo / f"patched_alpha{alpha}.safetensors"))
            model.eval()
            row = {"model": label, "alpha": float(alpha)}
            for set_name, data_dir in sets.items():
                result = evaluate(model, preprocess, tokenizer, data_dir, batch_size=128, return_scores=True)
                for kind, acc in relation_split(Path(data_dir), result["scores"]["replace_rel"]).items():
                    row[f"{set_name} replace_rel {kind}"] = None if acc is None else round(acc, 1)
                for subset in TWO_OBJECT_SUBSETS:
                    row[f"{set_name} {subset}"] = round(100 * result[subset], 1)
                row[f"{set_name} average"] = round(100 * sum(result[s] for s in TWO_OBJECT_SUBSETS)
                                                   / len(TWO_OBJECT_SUBSETS), 1)
            if scenes is None:
                scenes = probe_scenes(preprocess, tokenizer, seed, size, args.probe_train, args.probe_test)
            probe = direction_probe(model, scenes, seed)
            row.update({f"direction probe {tower}": round(acc, 1) for tower, acc in probe.items()})
            if alpha == "0":
                learned = direction_learned(model, scenes, seed, args.learn_steps)
                row.update({f"direction learned {tower}": round(acc, 1) for tower, acc in learned.items()})
            for subset, cos in text_cosines(model, tokenizer, sets["held-out"]).items():
                row[f"text cos {subset}"] = round(cos, 3)
            rows.append({**ctx, "demo_out": str(demo), "model_name": name, "seed": seed, **row})
            print(f"{label}: held-out avg {row['held-out average']:.1f}, seen avg {row.get('seen average')}, "
                  f"direction probe image {probe['image']:.1f} text {probe['text']:.1f}", flush=True)

    append_csv(RESULTS_DIR / f"{args.name}.csv", rows)
    sc = ["model"] + [f"{s} {k}" for s in sets for k in (*TWO_OBJECT_SUBSETS, "average")]
    md = [f"# Where the demo's compositional gain stops ({name}, seed {seed})", "", context_header(ctx), "",
          f"Command: `python benchmarks/bench_demo_probe.py --demo-out DIR` on a finished `clove-dist demo --seed "
          f"{seed}`. SugarCrepe-format accuracy in % ({num} examples per subset on each set: the world's held-out "
          "compositions, and compositions training shows in captions it does not"
          + ("" if "seen" in sets else " (not drawn: the training shards hold nearly every caption of the seen "
                                        "compositions)")
          + "; average: of the six subsets both sets have, add_obj left out):", "",
          markdown_table(rows, sc), "",
          "replace_rel apart: negatives naming the opposite direction (left of <-> right of, above <-> below; one "
          "in three) and those on the other axis:", "",
          markdown_table(rows, ["model"] + [f"{s} replace_rel {k}" for s in sets
                                            for k in ("opposite", "other axis")]), "",
          "Which way round (linear probe on frozen features, colour of the left or upper object, 6 colours; 50% = "
          f"knows the two colours, not where; {args.probe_train} training and {args.probe_test} test scenes), and "
          "mean cosine between the text embeddings of a caption and its negative:", "",
          markdown_table(rows, ["model", "direction probe image", "direction probe text"]
                         + [f"text cos {s}" for s in TWO_OBJECT_SUBSETS]), "",
          f"Can the base towers learn it: each trained whole, with a linear head, on the same label for "
          f"{args.learn_steps} steps of 64 scenes (AdamW, lr 1e-3), tested on the same test scenes:", "",
          markdown_table(rows[:1], ["model", "direction learned image", "direction learned text"])]
    (RESULTS_DIR / f"{args.name}.md").write_text("\n".join(md) + "\n")
    print(f"wrote {RESULTS_DIR / (args.name + '.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
