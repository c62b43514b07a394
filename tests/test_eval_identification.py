"""Tests for askd.eval.identification: hand-computed CMC and both mAPs, blocking, ties, distractors, the
no-match rule, input checks, and a tiny fake TinyFace tree evaluated end to end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from askd.data.folders import DataError
from askd.eval.identification import (
    DISTRACTOR_FOLDERS,
    DISTRACTOR_LABEL,
    embed_files,
    evaluate_tinyface,
    identification_metrics,
    identity_of,
    load_tinyface,
    match_pairs,
    stable_ranks,
    tinyface_lists,
)

# --------------------------------------------------------------------------------------- hand example
#
# Probes are the axes e1, e2, e3, so a probe's score with a gallery row is that row's unit vector's entry.
# Rows (4,3,0) and (0,3,4) have norm 5 exactly, so the ties below are exact.
#   gallery  label  p0   p1   p2
#   g0        0     1    0    0
#   g1       -1     .8   .6   0     distractor
#   g2        1     0    .6   .8
#   g3        2     .6   0    .8
#   g4        1     0    1    0
#   g5       -1     0    0    1     distractor
# p0: g0 first -> match at rank 1.                      AP = 1,   standard 1
# p1: g4, then g1 and g2 tied at .6 (g1 earlier) -> matches at ranks 1 and 3.
#     standard (1/1 + 2/3)/2 = 5/6; official ((1+1)/2 + (1/2 + 2/3)/2)/2 = 19/24
# p2: g5, then g2 and g3 tied at .8 (g2 earlier) -> match at rank 3.
#     standard 1/3; official (0/2 + 1/3)/2 = 1/6

PROBES = np.eye(3)
PROBE_LABELS = np.array([0, 1, 2])
GALLERY = np.array([[1, 0, 0], [4, 3, 0], [0, 3, 4], [3, 0, 4], [0, 1, 0], [0, 0, 1]], dtype=np.float64)
GALLERY_LABELS = np.array([0, -1, 1, 2, 1, -1])


def test_hand_example():
    r = identification_metrics(PROBES, PROBE_LABELS, GALLERY, GALLERY_LABELS, ranks=(1, 2, 3, 5))
    assert r["rank-1"] == pytest.approx(2 / 3)
    assert r["rank-2"] == pytest.approx(2 / 3)
    assert r["rank-3"] == pytest.approx(1.0)
    assert r["rank-5"] == pytest.approx(1.0)
    assert r["mAP_standard"] == pytest.approx((1 + 5 / 6 + 1 / 3) / 3)
    assert r["mAP"] == pytest.approx((1 + 19 / 24 + 1 / 6) / 3)
    assert (r["num_probes"], r["num_gallery"], r["num_distractors"], r["num_unmatched"]) == (3, 6, 2, 0)


def test_default_ranks_saturate_beyond_the_gallery():
    r = identification_metrics(PROBES, PROBE_LABELS, GALLERY, GALLERY_LABELS)
    assert [k for k in r if k.startswith("rank-")] == ["rank-1", "rank-5", "rank-10", "rank-20", "rank-50"]
    assert r["rank-50"] == 1.0


def test_ties_go_to_the_earlier_gallery_entry():
    # Swapping g1 (distractor) and g2 (p1's match) puts the match first among the tied pair: p1 -> ranks 1, 2.
    order = [0, 2, 1, 3, 4, 5]
    r = identification_metrics(PROBES, PROBE_LABELS, GALLERY[order], GALLERY_LABELS[order], ranks=(1,))
    # p2 now meets g1 (score 0) after g5, g2 (.8, earlier), g3 (.8): still rank 3.
    assert r["mAP_standard"] == pytest.approx((1 + 1 + 1 / 3) / 3)
    assert r["mAP"] == pytest.approx((1 + 1 + 1 / 6) / 3)


def test_all_tied_ranks_follow_gallery_order():
    gallery_labels = np.array([7, 5, 7, 6])
    r = identification_metrics(np.ones((2, 4)), [5, 7], np.ones((4, 4)), gallery_labels, ranks=(1, 2))
    # label 5: rank 2; label 7: ranks 1 and 3.
    assert (r["rank-1"], r["rank-2"]) == (0.5, 1.0)
    assert r["mAP_standard"] == pytest.approx((1 / 2 + (1 + 2 / 3) / 2) / 2)


def test_distractors_lower_the_rank():
    keep = GALLERY_LABELS != -1
    without = identification_metrics(PROBES, PROBE_LABELS, GALLERY[keep], GALLERY_LABELS[keep], ranks=(1,))
    with_them = identification_metrics(PROBES, PROBE_LABELS, GALLERY, GALLERY_LABELS, ranks=(1,))
    # Without g1 and g5: p1's matches at ranks 1, 2; p2's match at rank 2 (g2 still ties ahead of it).
    assert without["rank-1"] == pytest.approx(2 / 3) and without["num_distractors"] == 0
    assert without["mAP_standard"] == pytest.approx((1 + 1 + 1 / 2) / 3)
    assert with_them["mAP_standard"] < without["mAP_standard"]
    # A distractor equal to p0's match but later in the gallery loses the tie; earlier, it wins it.
    later = identification_metrics(PROBES[:1], [0], [[1.0, 0, 0], [2.0, 0, 0]], [0, -1], ranks=(1,))
    earlier = identification_metrics(PROBES[:1], [0], [[2.0, 0, 0], [1.0, 0, 0]], [-1, 0], ranks=(1,))
    assert (later["rank-1"], earlier["rank-1"]) == (1.0, 0.0)
    assert earlier["mAP"] == pytest.approx(1 / 4) and earlier["mAP_standard"] == pytest.approx(1 / 2)


def test_unmatched_probe_raises_by_default_and_counts_as_miss_on_request():
    labels = np.array([0, 1, 9])  # no gallery entry has label 9
    with pytest.raises(ValueError, match="1 probe.*no true match.*probe 2, label 9"):
        identification_metrics(PROBES, labels, GALLERY, GALLERY_LABELS)
    r = identification_metrics(PROBES, labels, GALLERY, GALLERY_LABELS, ranks=(1, 5), unmatched="miss")
    assert r["num_unmatched"] == 1
    assert (r["rank-1"], r["rank-5"]) == pytest.approx((2 / 3, 2 / 3))
    assert r["mAP_standard"] == pytest.approx((1 + 5 / 6 + 0) / 3)
    # The gallery entry labelled 2 now matches no probe: a distractor.
    assert r["num_distractors"] == 3
    nobody = identification_metrics(PROBES, [8, 9, 10], GALLERY, GALLERY_LABELS, unmatched="miss")
    assert nobody["rank-50"] == 0.0 and nobody["mAP"] == 0.0


# ------------------------------------------------------------------------------- against a reference


def reference_metrics(probe, probe_labels, gallery, gallery_labels, ranks):
    """Full score matrix, a stable argsort per row and the official AP loop written out step by step."""
    unit = [x / np.linalg.norm(x, axis=1, keepdims=True) for x in (probe, gallery)]
    scores = unit[0] @ unit[1].T
    hits, aps, aps_standard = [], [], []
    for p in range(len(probe)):
        good = gallery_labels[np.argsort(-scores[p], kind="stable")] == probe_labels[p]
        found, ap, ap_standard, last_precision, last_recall = 0, 0.0, 0.0, 1.0, 0.0
        for n, is_good in enumerate(good, start=1):
            found += bool(is_good)
            precision, recall = found / n, found / good.sum()
            ap += (recall - last_recall) * (last_precision + precision) / 2
            ap_standard += precision / good.sum() if is_good else 0.0
            last_precision, last_recall = precision, recall
        hits.append(np.argmax(good) + 1)
        aps.append(ap)
        aps_standard.append(ap_standard)
    return {f"rank-{k}": np.mean(np.array(hits) <= k) for k in ranks}, np.mean(aps), np.mean(aps_standard)


@pytest.mark.parametrize("seed", [0, 1])
def test_matches_reference_and_block_size_changes_nothing(seed):
    rng = np.random.default_rng(seed)
    num_ids, dim = 6, 5
    centres = rng.normal(size=(num_ids, dim))
    probe_labels = rng.integers(0, num_ids, size=11)
    gallery_labels = np.concatenate([np.arange(num_ids), rng.integers(0, num_ids, 7), np.full(9, -1)])
    rng.shuffle(gallery_labels)
    probe = centres[probe_labels] + rng.normal(scale=1.0, size=(11, dim))
    gallery = np.where(gallery_labels[:, None] >= 0, centres[gallery_labels.clip(0)], 0) + rng.normal(size=(22, dim))
    ranks = (1, 2, 3, 5, 10)
    cmc, m_ap, m_ap_standard = reference_metrics(probe, probe_labels, gallery, gallery_labels, ranks)
    results = [identification_metrics(probe, probe_labels, gallery, gallery_labels, ranks, b) for b in (1, 3, 4096)]
    assert results[0] == results[1] == results[2]
    assert {k: results[0][k] for k in cmc} == pytest.approx(cmc)
    assert results[0]["mAP"] == pytest.approx(m_ap)
    assert results[0]["mAP_standard"] == pytest.approx(m_ap_standard)
    assert 0 < results[0]["mAP"] < results[0]["mAP_standard"] < 1  # the trapezoid never exceeds the standard AP


def test_tensors_and_dtypes_are_accepted():
    ref = identification_metrics(PROBES, PROBE_LABELS, GALLERY, GALLERY_LABELS)
    probe, probe_labels = torch.tensor(PROBES, dtype=torch.float32), torch.tensor(PROBE_LABELS, dtype=torch.int32)
    got = identification_metrics(probe, probe_labels, torch.tensor(GALLERY, dtype=torch.float16), GALLERY_LABELS)
    assert got == ref


def test_match_pairs_and_stable_ranks():
    probe_idx, gallery_idx, starts = match_pairs(np.array([1, 3, 0]), np.array([0, 1, -1, 1, 0]))
    assert probe_idx.tolist() == [0, 0, 2, 2] and gallery_idx.tolist() == [1, 3, 0, 4]
    assert starts.tolist() == [0, 2, 2, 4]
    scores = torch.tensor([[0.5, 0.9, 0.5, 0.5], [0.1, 0.2, 0.3, 0.4]])
    assert stable_ranks(scores, torch.tensor([0, 2])).tolist() == [2, 2]
    assert stable_ranks(scores[[0, 0]], torch.tensor([3, 1])).tolist() == [4, 1]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"probe_feat": np.ones(3)}, "probe_feat must be floating-point"),
        ({"gallery_feat": np.ones((6, 3), dtype=np.int64)}, "gallery_feat must be floating-point"),
        ({"gallery_feat": np.ones((0, 3))}, "gallery_feat must be floating-point"),
        ({"gallery_feat": np.ones((6, 4))}, "differ in dimension: 3 vs 4"),
        ({"probe_feat": np.full((3, 3), np.nan)}, "NaN or inf"),
        ({"probe_labels": np.array([0, 1])}, r"probe_labels must be \(3,\) integers, one per"),
        ({"gallery_labels": GALLERY_LABELS.astype(float)}, r"gallery_labels must be \(6,\) integers"),
        ({"ranks": (0, 5)}, "ranks must be"),
        ({"ranks": ()}, "ranks must be"),
        ({"block": 0}, "block must be"),
        ({"unmatched": "skip"}, "unknown unmatched rule"),
    ],
)
def test_bad_inputs_raise(change, message):
    args = {"probe_feat": PROBES, "probe_labels": PROBE_LABELS, "gallery_feat": GALLERY,
            "gallery_labels": GALLERY_LABELS, **change}
    with pytest.raises(ValueError, match=message):
        identification_metrics(**args)


# ---------------------------------------------------------------------------------------- TinyFace tree

# Solid colours: the mean-colour model maps identity 1 to red, 2 to green, distractors to blue and grey.
RED, GREEN, BLUE, GREY, DARK_RED = (255, 0, 0), (0, 255, 0), (0, 0, 255), (128, 128, 128), (160, 0, 0)


class MeanColour(nn.Module):
    """Embedding = mean colour of the input (B,3), returned as ``(embedding, maps)`` like the askd models."""

    def __init__(self):
        super().__init__()
        self.batch_sizes = []

    def forward(self, x):
        self.batch_sizes.append(len(x))
        return x.mean((2, 3)), []


def _png(path, colour, size=(16, 20)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), colour, np.uint8)).save(path)


def fake_tinyface(root, distractor_folder="Gallery_Distractor"):
    """root/tinyface/Testing_Set with 3 probes (ids 1, 1, 2), 3 gallery matches, 3 distractors (two nested)."""
    base = root / "tinyface" / "Testing_Set"
    _png(base / "Probe" / "1_1.png", RED)
    _png(base / "Probe" / "1_2.png", DARK_RED)
    _png(base / "Probe" / "2_1.png", GREEN)
    _png(base / "Gallery_Match" / "1_3.png", RED)
    _png(base / "Gallery_Match" / "1_4.png", RED)
    _png(base / "Gallery_Match" / "2_2.png", GREEN)
    _png(base / distractor_folder / "a" / "0_0_img1.png", BLUE)  # a sub-folder, as some copies have
    _png(base / distractor_folder / "a" / "0_0_img2.png", GREY)
    _png(base / distractor_folder / "x_img3.jpg", BLUE)
    return root / "tinyface"


def test_identity_of():
    assert identity_of(Path("1_3.jpg")) == 1 and identity_of(Path("d/2569_10_x.png")) == 2569
    for bad in ("13.jpg", "a_3.jpg", "_3.jpg", "-1_3.jpg"):
        with pytest.raises(DataError, match="cannot read an identity"):
            identity_of(Path(bad))


@pytest.mark.parametrize("spelling", DISTRACTOR_FOLDERS)
def test_lists_accept_both_spellings_and_either_root(tmp_path, spelling):
    root = fake_tinyface(tmp_path, spelling)
    for where in (root, root / "Testing_Set"):
        lists = tinyface_lists(where)
        assert lists.distractor_folder == spelling
        assert [p.name for p in lists.probe_paths] == ["1_1.png", "1_2.png", "2_1.png"]
        assert lists.probe_labels.tolist() == [1, 1, 2]
        # Gallery_Match first, then the distractors by path (sub-folder "a" before the top-level file).
        assert [p.name for p in lists.gallery_paths] == ["1_3.png", "1_4.png", "2_2.png", "0_0_img1.png",
                                                         "0_0_img2.png", "x_img3.jpg"]
        assert lists.gallery_labels.tolist() == [1, 1, 2] + [DISTRACTOR_LABEL] * 3


def test_load_tinyface_resizes_to_size(tmp_path):
    probe, probe_labels, gallery, gallery_labels = load_tinyface(fake_tinyface(tmp_path), size=8)
    assert probe.shape == (3, 3, 8, 8) and gallery.shape == (6, 3, 8, 8)
    assert probe.dtype == gallery.dtype == torch.uint8
    assert probe_labels.tolist() == [1, 1, 2] and gallery_labels.tolist() == [1, 1, 2, -1, -1, -1]
    assert probe[0].flatten(1).unique(dim=1).tolist() == [[255], [0], [0]]  # a solid colour stays solid


def test_layout_errors(tmp_path):
    root = fake_tinyface(tmp_path)
    with pytest.raises(DataError, match="not a TinyFace test set: missing"):
        tinyface_lists(tmp_path / "nowhere")
    (root / "Testing_Set" / "Gallery_Disctractor").mkdir()
    with pytest.raises(DataError, match="holds both"):
        tinyface_lists(root)
    (root / "Testing_Set" / "Gallery_Disctractor").rmdir()
    for f in (root / "Testing_Set" / "Gallery_Distractor").rglob("*.*"):
        f.unlink()
    with pytest.raises(DataError, match="no images under"):
        tinyface_lists(root)
    (root / "Testing_Set" / "Gallery_Distractor").rename(root / "Testing_Set" / "Distractors")
    with pytest.raises(DataError, match=r"missing \['Gallery_Distractor or Gallery_Disctractor'\]"):
        tinyface_lists(root)
    _png(root / "Testing_Set" / "Gallery_Distractor" / "d.png", BLUE)
    _png(root / "Testing_Set" / "Probe" / "nameless.png", RED)
    with pytest.raises(DataError, match="nameless.png"):
        tinyface_lists(root)


def test_evaluate_tinyface_perfect(tmp_path):
    # In [-1,1] red is (1,-1,-1) and dark red (0.25,-1,-1): both close to red, far from green, blue, grey.
    model = MeanColour()
    r = evaluate_tinyface(model, fake_tinyface(tmp_path, "Gallery_Disctractor"), batch_size=4, size=8)
    assert r["distractor_folder"] == "Gallery_Disctractor"
    assert all(r[f"rank-{k}"] == 1.0 for k in (1, 5, 10, 20, 50))
    assert r["mAP"] == r["mAP_standard"] == 1.0
    assert (r["num_probes"], r["num_gallery"], r["num_distractors"]) == (3, 6, 3)
    assert model.batch_sizes == [8, 8, 2] and model.training  # flip doubles each batch; train mode restored


def test_evaluate_tinyface_distractor_and_transform(tmp_path):
    root = fake_tinyface(tmp_path)
    _png(root / "Testing_Set" / "Gallery_Distractor" / "0_0_img0.png", GREEN)  # ties with 2_2, but later
    r = evaluate_tinyface(MeanColour(), root, batch_size=64, size=8, flip=False, ranks=(1,))
    assert r["rank-1"] == 1.0 and r["num_distractors"] == 4
    # A transform that blanks every image makes all scores tie: ranks follow gallery order (1_3, 1_4, 2_2, ...).
    r = evaluate_tinyface(MeanColour(), root, size=8, transform=torch.zeros_like, ranks=(1, 2, 3))
    # ids 1, 1 (matches at ranks 1, 2) and 2 (rank 3).
    assert (r["rank-1"], r["rank-2"], r["rank-3"]) == pytest.approx((2 / 3, 2 / 3, 1.0))
    assert r["mAP_standard"] == pytest.approx((1 + 1 + 1 / 3) / 3)


def test_embed_files_streams_batches(tmp_path):
    root = fake_tinyface(tmp_path)
    lists = tinyface_lists(root)
    model = MeanColour()
    feat = embed_files(model, lists.gallery_paths, size=8, batch_size=4, flip=False)
    assert feat.shape == (6, 3) and feat.dtype == torch.float32
    assert model.batch_sizes == [4, 2]
    assert torch.allclose(feat[0], torch.tensor([1.0, -1.0, -1.0]))
    with pytest.raises(ValueError, match="batch_size"):
        embed_files(model, lists.gallery_paths, batch_size=0)
