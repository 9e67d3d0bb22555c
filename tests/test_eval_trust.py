"""Evaluation you can trust: CLIP_benchmark's class-name indices, damaged shards, strict missing-image shares."""
from __future__ import annotations

import numpy as np
import pytest

from clove_dist.eval import zeroshot
from clove_dist.eval.wds_layout import check_missing_share
from test_eval import TableModel, TableTokenizer, _png_bytes, _write_clip_benchmark, id_preprocess


def test_blank_and_repeated_class_names_keep_their_label_index(tmp_path):
    # Lines: 0 "cat", 1 "", 2 "dog", 3 "cat". Labels index lines, as in CLIP_benchmark; dropping the blank line
    # would move "dog" to label 1 and misread every label-2 sample.
    classnames = ["cat", "", "dog", "cat"]
    templates = ["a photo of a {c}."]
    texts = [t.replace("{c}", c) for c in classnames for t in templates]
    # Class directions: 0 -> e0, 1 -> e1, 2 -> e2, 3 -> e3; two texts are equal ("a photo of a cat."), so the
    # tokenizer maps both to one vector: classes 0 and 3 share it.
    unique = list(dict.fromkeys(texts))
    vec = {"a photo of a cat.": np.eye(4)[0], "a photo of a .": np.eye(4)[1], "a photo of a dog.": np.eye(4)[2]}
    labels = [2, 2, 0, 1]
    samples = [(f"s{i:07d}", {"png": _png_bytes(i), "cls": str(l).encode()}) for i, l in enumerate(labels)]
    _write_clip_benchmark(tmp_path, classnames, templates, samples, per_shard=10)
    (tmp_path / "classnames.txt").write_text("cat\n\ndog\ncat\n")  # the blank line written as it is
    images = np.stack([np.eye(4)[2], np.eye(4)[2], np.eye(4)[0], np.eye(4)[1]])
    model = TableModel(images, np.stack([vec[t] for t in unique]))
    res = zeroshot.evaluate(model, id_preprocess, TableTokenizer(unique), tmp_path)
    assert res["num_classes"] == 4
    # The dog images (label 2) are right only if "dog" kept index 2; the blank class (label 1) is its own class.
    assert res["per_class"]["dog"] == 1.0 and res["per_class"]["[label 1]"] == 1.0
    # The cat image ties between classes 0 and 3 (same prompt); topk gives it to one of them: 0 or 1 right.
    assert res["per_class"]["cat [label 3]"] is None
    assert any("blank or repeated" in n for n in res["notes"])


def test_damaged_zero_shot_shard_is_skipped_and_counted(tmp_path):
    classnames = ["a", "b"]
    samples = [(f"s{i:07d}", {"png": _png_bytes(i), "cls": str(i % 2).encode()}) for i in range(6)]
    _write_clip_benchmark(tmp_path, classnames, ["{c}"], samples, per_shard=2)
    (tmp_path / "test" / "1.tar").write_bytes(b"\x00garbage" * 300)  # samples 2 and 3 are lost
    images = np.stack([np.eye(2)[i % 2] for i in range(6)])
    model = TableModel(images, np.eye(2))
    res = zeroshot.evaluate(model, id_preprocess, TableTokenizer(classnames), tmp_path)
    assert res["num_damaged_shards"] == 1 and res["num_examples"] == 4 and res["top1"] == 1.0
    assert any("1 damaged shard(s)" in n and "1.tar" in n for n in res["notes"])


@pytest.mark.parametrize("missing, total, share, fails", [(0, 10, 0.0, False), (1, 10, 0.0, True),
                                                          (1, 10, 0.1, False), (2, 10, 0.1, True)])
def test_strict_share_is_a_bound_not_a_count(missing, total, share, fails):
    if fails:
        with pytest.raises(ValueError, match=f"{missing} of {total} images"):
            check_missing_share("set", missing, total, True, share, "dir")
    else:
        check_missing_share("set", missing, total, True, share, "dir")
    check_missing_share("set", missing, total, False, share, "dir")  # not strict: never raises
