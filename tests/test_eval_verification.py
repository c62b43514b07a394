"""Tests for askd.eval.verification: folds, both protocols' threshold rules, pair sampling, flip TTA."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import askd.models
from askd.data import degrade
from askd.eval import (
    ASKD_THRESHOLDS,
    INSIGHTFACE_THRESHOLDS,
    askd_scores,
    best_threshold,
    combine_flip,
    evaluate_pairs,
    flip_features,
    fold_indices,
    make_pairs,
    threshold_accuracies,
    verification_accuracy,
)

# ----------------------------------------------------------------------------------------------- helpers


def unit_pairs_at_distance(dists) -> tuple[np.ndarray, np.ndarray]:
    """2-D unit vectors a = (1, 0), b at angle theta with squared distance 2 - 2 cos(theta) = d."""
    cos = 1 - np.asarray(dists, dtype=np.float64) / 2
    feat_a = np.tile([1.0, 0.0], (len(cos), 1))
    feat_b = np.stack([cos, np.sqrt(1 - cos**2)], axis=1)
    return feat_a, feat_b


def reference_accuracy(feat_a, feat_b, issame, protocol, nfolds=10) -> tuple[list, list]:
    """Straightforward re-statement of both protocols: every threshold compared with every pair."""
    n = len(issame)
    sizes = [n // nfolds + (k < n % nfolds) for k in range(nfolds)]
    fold_of = np.repeat(np.arange(nfolds), sizes)
    accs, thresholds = [], []
    for k in range(nfolds):
        train, test = fold_of != k, fold_of == k
        if protocol == "insightface":
            a = feat_a / np.linalg.norm(feat_a, axis=1, keepdims=True)
            b = feat_b / np.linalg.norm(feat_b, axis=1, keepdims=True)
            values, grid = ((a - b) ** 2).sum(1), np.arange(0, 4, 0.01)

            def acc(v, s, t):
                return ((v[None] < t[:, None]) == s[None]).mean(1)

        else:
            mu = np.vstack([feat_a[train], feat_b[train]]).mean(0)
            a, b = feat_a - mu, feat_b - mu
            a, b = a / np.linalg.norm(a, axis=1, keepdims=True), b / np.linalg.norm(b, axis=1, keepdims=True)
            values, grid = (a * b).sum(1), np.arange(-10000, 10001) / 10000

            def acc(v, s, t):
                return ((s[None] & (v[None] > t[:, None])) | (~s[None] & (v[None] < t[:, None]))).mean(1)

        train_acc = acc(values[train], issame[train], grid)
        best = train_acc == train_acc.max()
        t = grid[np.argmax(train_acc)] if protocol == "insightface" else grid[best].mean()
        accs.append(acc(values[test], issame[test], np.array([t]))[0])
        thresholds.append(t)
    return accs, thresholds


def separable_pairs(num_pairs=200, dim=32, seed=0):
    rng = np.random.default_rng(seed)
    feat_a = rng.normal(size=(num_pairs, dim))
    issame = np.arange(num_pairs) % 2 == 0
    feat_b = np.where(issame[:, None], feat_a + 0.01 * rng.normal(size=feat_a.shape), rng.normal(size=feat_a.shape))
    return feat_a, feat_b, issame


# ------------------------------------------------------------------------------------------------- folds


def test_fold_indices_contiguous_with_larger_first_folds():
    folds = fold_indices(25, 10)
    assert [len(f) for f in folds] == [3] * 5 + [2] * 5
    np.testing.assert_array_equal(np.concatenate(folds), np.arange(25))
    for f in folds:
        np.testing.assert_array_equal(f, np.arange(f[0], f[0] + len(f)))
    assert [len(f) for f in fold_indices(30, 10)] == [3] * 10


@pytest.mark.parametrize("num_pairs, nfolds", [(9, 10), (10, 1)])
def test_fold_indices_rejects_bad_sizes(num_pairs, nfolds):
    with pytest.raises(ValueError, match="nfolds"):
        fold_indices(num_pairs, nfolds)


# -------------------------------------------------------------------------------------------- accuracy


def test_threshold_grids():
    assert len(ASKD_THRESHOLDS) == 20001
    assert ASKD_THRESHOLDS[0] == -1.0 and ASKD_THRESHOLDS[-1] == 1.0 and ASKD_THRESHOLDS[10000] == 0.0
    np.testing.assert_allclose(np.diff(ASKD_THRESHOLDS), 1e-4, atol=1e-12)
    assert len(INSIGHTFACE_THRESHOLDS) == 400
    assert INSIGHTFACE_THRESHOLDS[0] == 0.0 and INSIGHTFACE_THRESHOLDS[-1] == pytest.approx(3.99)


@pytest.mark.parametrize("protocol", ["insightface", "askd"])
def test_separable_embeddings_give_accuracy_one(protocol):
    result = verification_accuracy(*separable_pairs(), protocol=protocol)
    assert result["accuracy"] == 1.0 and result["std"] == 0.0
    assert result["fold_accuracies"] == [1.0] * 10 and len(result["thresholds"]) == 10


@pytest.mark.parametrize("protocol", ["insightface", "askd"])
def test_random_embeddings_give_chance_accuracy(protocol):
    rng = np.random.default_rng(1)
    feat_a, feat_b = rng.normal(size=(2000, 64)), rng.normal(size=(2000, 64))
    issame = rng.random(2000) < 0.5
    assert abs(verification_accuracy(feat_a, feat_b, issame, protocol)["accuracy"] - 0.5) < 0.05


@pytest.mark.parametrize("protocol", ["insightface", "askd"])
def test_matches_brute_force_reference(protocol):
    rng = np.random.default_rng(2)
    issame = rng.random(103) < 0.5
    feat_a = rng.normal(size=(103, 8)) + 3.0  # an offset so that the askd mean subtraction matters
    feat_b = np.where(issame[:, None], feat_a + rng.normal(size=(103, 8)), rng.normal(size=(103, 8)) + 3.0)
    result = verification_accuracy(torch.from_numpy(feat_a), torch.from_numpy(feat_b), issame, protocol)
    accs, thresholds = reference_accuracy(feat_a, feat_b, issame, protocol)
    np.testing.assert_allclose(result["fold_accuracies"], accs, atol=1e-12)
    np.testing.assert_allclose(result["thresholds"], thresholds, atol=1e-12)
    assert result["accuracy"] == pytest.approx(np.mean(accs))
    assert result["std"] == pytest.approx(np.std(accs))


def test_insightface_ties_go_to_the_first_threshold():
    # fold 0: genuine at distance 0.203, impostor at 1.003; fold 1: genuine 0.603, impostor 1.603.
    feat_a, feat_b = unit_pairs_at_distance([0.203, 1.003, 0.603, 1.603])
    issame = np.array([True, False, True, False])
    result = verification_accuracy(feat_a, feat_b, issame, "insightface", nfolds=2)
    # Fold 0 tests with t from fold 1, where 0.61 .. 1.60 all score 1: the first, 0.61, separates fold 0.
    # Fold 1 tests with t from fold 0, where 0.21 .. 1.00 all score 1: the first, 0.21, puts the genuine
    # 0.603 on the wrong side (the mean of the ties, 0.605, would not).
    np.testing.assert_allclose(result["thresholds"], [0.61, 0.21], atol=1e-12)
    assert result["fold_accuracies"] == [1.0, 0.5] and result["accuracy"] == 0.75


def test_insightface_same_means_strictly_below_threshold():
    values, issame = np.array([0.5, 1.5]), np.array([True, False])
    acc = threshold_accuracies(values, issame, "insightface", [0.5, 0.51, 1.5, 1.51])
    np.testing.assert_array_equal(acc, [0.5, 1.0, 1.0, 0.5])


def test_askd_ties_take_the_mean_and_equal_scores_count_as_wrong():
    values, issame = np.array([0.3, -0.1]), np.array([True, False])
    # A score equal to the threshold is wrong for either class.
    np.testing.assert_array_equal(threshold_accuracies(values, issame, "askd", [0.3, -0.1, 0.0]), [0.5, 0.5, 1.0])
    # Tied best: -0.0999 .. 0.2999 (both ends excluded by the equality rule), mean 0.1. Counting an equal
    # score as right would give 0.10005 (genuine) or 0.09995 (impostor).
    assert best_threshold(values, issame, "askd") == pytest.approx(0.1, abs=1e-12)


def test_askd_protocol_end_to_end_tie_rule():
    # Each fold holds its pairs and their negations: mu = 0 on either training fold and the scores are
    # the cosines below, kept off the 1e-4 grid so that rounding cannot move a tie's end.
    def fold(cosines):
        feat_a, feat_b = unit_pairs_at_distance(2 - 2 * np.array(cosines))
        return np.concatenate([feat_a, -feat_a]), np.concatenate([feat_b, -feat_b])

    (a0, b0), (a1, b1) = fold([0.30005, -0.10005]), fold([0.05005, -0.20005])
    issame = np.array([True, False] * 4)
    result = verification_accuracy(np.vstack([a0, a1]), np.vstack([b0, b1]), issame, "askd", nfolds=2)
    # Fold 0 tests with the ties of fold 1, -0.2000 .. 0.0500, mean -0.075: all right.
    # Fold 1 tests with the ties of fold 0, -0.1000 .. 0.3000, mean 0.1: its genuine 0.05005 are wrong
    # (the first of the ties, -0.1, would have them right).
    assert result["thresholds"] == pytest.approx([-0.075, 0.1], abs=1e-12)
    assert result["fold_accuracies"] == [1.0, 0.5]


def test_askd_mean_comes_from_training_rows_only():
    rng = np.random.default_rng(3)
    feat_a, feat_b = rng.normal(size=(6, 4)), rng.normal(size=(6, 4))
    feat_a[4:] += 50.0  # the "test" rows are far off: including them would move mu a lot
    train = np.array([True] * 4 + [False] * 2)
    mu = np.concatenate([feat_a[:4], feat_b[:4]]).mean(0)
    a, b = feat_a - mu, feat_b - mu
    expected = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    np.testing.assert_allclose(askd_scores(feat_a, feat_b, train), expected, atol=1e-12)
    all_rows = askd_scores(feat_a, feat_b, np.ones(6, bool))
    assert np.abs(all_rows - expected).max() > 0.1


@pytest.mark.parametrize(
    "feat_a, feat_b, issame, nfolds, match",
    [
        (np.zeros((20, 4)), np.zeros((19, 4)), np.ones(20, bool), 10, "feat_a and feat_b"),
        (np.zeros(20), np.zeros(20), np.ones(20, bool), 10, "feat_a and feat_b"),
        (np.ones((20, 4)), np.ones((20, 4)), np.ones(19, bool), 10, "issame"),
        (np.ones((20, 4)), np.ones((20, 4)), np.full(20, 2), 10, "issame"),
        (np.ones((8, 4)), np.ones((8, 4)), np.ones(8, bool), 10, "nfolds"),
        (np.full((20, 4), np.nan), np.ones((20, 4)), np.ones(20, bool), 10, "NaN"),
    ],
)
def test_verification_accuracy_rejects_bad_input(feat_a, feat_b, issame, nfolds, match):
    with pytest.raises(ValueError, match=match):
        verification_accuracy(feat_a, feat_b, issame, nfolds=nfolds)


def test_unknown_protocol():
    with pytest.raises(ValueError, match="protocol"):
        verification_accuracy(np.ones((20, 2)), np.ones((20, 2)), np.ones(20, bool), protocol="lfw")


# ------------------------------------------------------------------------------------------------- pairs


def test_make_pairs_balanced_valid_and_fold_mixed():
    labels = np.repeat(np.arange(20), 5)
    idx_a, idx_b, issame = make_pairs(labels, 300, seed=0)
    assert idx_a.dtype == torch.int64 and idx_b.dtype == torch.int64 and issame.dtype == torch.bool
    assert idx_a.shape == idx_b.shape == issame.shape == (300,)
    assert int(issame.sum()) == 150
    same_label = torch.from_numpy(labels)[idx_a] == torch.from_numpy(labels)[idx_b]
    assert torch.equal(same_label, issame)
    assert bool((idx_a != idx_b).all())
    unordered = {tuple(sorted(p)) for p in zip(idx_a.tolist(), idx_b.tolist(), strict=True)}
    assert len(unordered) == 300
    for fold in fold_indices(300, 10):
        kinds = issame[torch.from_numpy(fold)]
        assert int(kinds.sum()) == len(fold) // 2


def test_make_pairs_deterministic_per_seed():
    labels = torch.arange(40) // 4
    first, again, other = make_pairs(labels, 60, seed=5), make_pairs(labels, 60, seed=5), make_pairs(labels, 60, seed=6)
    assert all(torch.equal(x, y) for x, y in zip(first, again, strict=True))
    assert not torch.equal(first[0], other[0])


def test_make_pairs_repeats_only_when_unavoidable():
    labels = [0, 0, 1, 2]  # one genuine pair exists, five impostor pairs
    idx_a, idx_b, issame = make_pairs(labels, 8)
    assert {(a, b) for a, b, s in zip(idx_a.tolist(), idx_b.tolist(), issame.tolist(), strict=True) if s} == {(0, 1)}
    impostors = {tuple(sorted(p)) for p in zip(idx_a[~issame].tolist(), idx_b[~issame].tolist(), strict=True)}
    assert len(impostors) == 4


def test_make_pairs_odd_count_has_one_more_genuine():
    _, _, issame = make_pairs([0, 0, 1, 1], 5)
    assert issame.tolist() == [True, False, True, False, True]


@pytest.mark.parametrize(
    "labels, num_pairs, match",
    [
        ([0, 1, 2, 3], 10, "at least 2 images"),
        ([7, 7, 7], 10, "at least 2 identities"),
        ([0, 0, 1], 1, "num_pairs"),
        ([[0, 0], [1, 1]], 4, "1-D"),
        ([0.0, 0.0, 1.0], 4, "integers"),
    ],
)
def test_make_pairs_rejects_bad_input(labels, num_pairs, match):
    with pytest.raises(ValueError, match=match):
        make_pairs(labels, num_pairs)


# --------------------------------------------------------------------------------------------- embedding


class RowModel(nn.Module):
    """Embedding = the first image row of channel 0, (B,112); records whether it ran in eval mode."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.modes = []

    def forward(self, x):
        self.modes.append(self.training)
        return x[:, 0, 0, :] * self.scale, []


def test_flip_features_flips_width_and_applies_transform():
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (3, 3, 112, 112), dtype=torch.uint8, generator=gen)
    model = RowModel().train()
    feat, feat_flip = flip_features(model, images, batch_size=2)
    expected = images[:, 0, 0, :].float() / 127.5 - 1
    assert feat.dtype == torch.float32 and feat.shape == (3, 112)
    torch.testing.assert_close(feat, expected)
    torch.testing.assert_close(feat_flip, expected.flip(1))
    assert model.modes == [False] * 2 and model.training  # eval inside, the caller's mode restored after

    feat_t, flip_t = flip_features(model, images, transform=lambda x: 2 * x + 1)
    torch.testing.assert_close(feat_t, 2 * expected + 1)
    torch.testing.assert_close(flip_t, 2 * expected.flip(1) + 1)


def test_flip_features_rejects_float_images():
    with pytest.raises(ValueError, match="uint8"):
        flip_features(RowModel(), torch.zeros(2, 3, 112, 112))


def test_combine_flip():
    feat, feat_flip = torch.ones(3, 4), 2 * torch.ones(3, 4)
    torch.testing.assert_close(combine_flip(feat, feat_flip, "insightface"), 3 * torch.ones(3, 4))
    torch.testing.assert_close(combine_flip(feat, feat_flip, "askd"), torch.cat([feat, feat_flip], 1))
    with pytest.raises(ValueError, match="feat and feat_flip"):
        combine_flip(feat, torch.ones(3, 5), "askd")


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return askd.models.create("ir_tiny_cbam")


@pytest.mark.parametrize("protocol", ["insightface", "askd"])
def test_evaluate_pairs_end_to_end(protocol, tiny_model):
    model = tiny_model
    images = torch.randint(0, 256, (20, 3, 112, 112), dtype=torch.uint8)
    idx_a, idx_b, issame = make_pairs(torch.arange(20) // 4, 20)
    result = evaluate_pairs(model, images, idx_a, idx_b, issame, protocol, transform=lambda x: degrade(x, 14))
    assert set(result) == {"accuracy", "std", "fold_accuracies", "thresholds"}
    assert 0.0 <= result["accuracy"] <= 1.0
    assert len(result["fold_accuracies"]) == len(result["thresholds"]) == 10


def test_evaluate_pairs_rejects_out_of_range_index():
    images = torch.zeros(4, 3, 112, 112, dtype=torch.uint8)
    idx_a, idx_b = torch.zeros(10, dtype=torch.long), torch.full((10,), 4)
    with pytest.raises(ValueError, match="idx_b"):
        evaluate_pairs(RowModel(), images, idx_a, idx_b, torch.ones(10, dtype=torch.bool))
