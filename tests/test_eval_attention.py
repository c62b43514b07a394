"""Tests for askd.eval.attention: Pearson r, its pooled accumulation, per-block teacher-student r."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import askd.models
from askd.data import degrade
from askd.eval import PearsonAccumulator, attention_correlation, pearson
from askd.eval.verification import to_model_input


def test_pearson_on_constructed_data():
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(0))
    assert pearson(x, x) == pytest.approx(1.0, abs=1e-12)
    assert pearson(x, -x) == pytest.approx(-1.0, abs=1e-12)
    assert pearson(x, 3.5 * x.reshape(20) - 7.0) == pytest.approx(1.0, abs=1e-12)
    assert pearson(torch.full((20,), 0.1), x) == 0.0
    assert pearson(x, torch.full((4, 5), 2.0)) == 0.0
    y = torch.randn(20, generator=torch.Generator().manual_seed(1))
    assert pearson(x, y) == pytest.approx(np.corrcoef(x.reshape(-1).numpy(), y.numpy())[0, 1], abs=1e-12)


def test_pearson_rejects_size_mismatch():
    with pytest.raises(ValueError, match="equal size"):
        pearson(torch.ones(3), torch.ones(4))


def test_accumulator_pools_chunks_like_one_computation():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(1000, generator=gen, dtype=torch.float64) + 1e4  # a large offset: the shift must cope
    y = 0.3 * x + torch.randn(1000, generator=gen, dtype=torch.float64)
    acc = PearsonAccumulator()
    for cx, cy in zip(x.split(137), y.split(137), strict=True):
        acc.update(cx, cy)
    assert acc.n == 1000
    assert acc.value() == pytest.approx(np.corrcoef(x.numpy(), y.numpy())[0, 1], abs=1e-9)
    constant = PearsonAccumulator()
    constant.update(torch.full((5,), 0.1), torch.arange(5.0))
    constant.update(torch.full((3,), 0.1), torch.arange(3.0))
    assert constant.value() == 0.0 and PearsonAccumulator().value() == 0.0


def tiny_model():
    # reduction=2: the default 16 leaves the first block's channel MLP one hidden unit, which a random
    # init can leave dead (a constant map, r = 0 by definition).
    return askd.models.create("ir_tiny_cbam", reduction=2)


@pytest.fixture(scope="module")
def images():
    return torch.randint(0, 256, (3, 3, 112, 112), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))


def test_same_model_identity_transform_gives_r_one(images):
    torch.manual_seed(0)
    model = tiny_model()
    result = attention_correlation(model, model, images, lambda x: x, batch_size=2)
    assert [r["block"] for r in result] == list(range(len(model.blocks)))
    assert all(set(r) == {"block", "channel_r", "spatial_r"} for r in result)
    for r in result:
        assert r["channel_r"] == pytest.approx(1.0, abs=1e-6) and r["spatial_r"] == pytest.approx(1.0, abs=1e-6)


def test_pooled_r_equals_r_of_concatenated_maps(images):
    torch.manual_seed(0)
    teacher, student = tiny_model().eval(), tiny_model().train()
    result = attention_correlation(teacher, student, images, lambda x: degrade(x, 14), batch_size=2)
    assert not teacher.training and student.training  # each model's mode is restored
    # The same batches as above, so that the fp32 maps are bit-identical; then concatenate every map.
    with torch.inference_mode():
        batches = [to_model_input(x) for x in images.split(2)]
        teacher_maps = [teacher.eval()(x)[1] for x in batches]
        student_maps = [student.eval()(degrade(x, 14))[1] for x in batches]
    for i, r in enumerate(result):
        tc, ts = (torch.cat([m[i][k].reshape(-1) for m in teacher_maps]) for k in (0, 1))
        sc, ss = (torch.cat([m[i][k].reshape(-1) for m in student_maps]) for k in (0, 1))
        assert r["channel_r"] == pytest.approx(np.corrcoef(tc, sc)[0, 1], abs=1e-10)
        assert r["spatial_r"] == pytest.approx(np.corrcoef(ts, ss)[0, 1], abs=1e-10)
        assert -1.0 <= r["spatial_r"] < 1.0


def test_attention_correlation_rejects_bad_input(images):
    model = tiny_model()
    with pytest.raises(ValueError, match="transform"):
        attention_correlation(model, model, images, transform=None)
    with pytest.raises(ValueError, match="uint8"):
        attention_correlation(model, model, images.float(), transform=lambda x: x)
    with pytest.raises(ValueError, match="batch_size"):
        attention_correlation(model, model, images, lambda x: x, batch_size=0)
