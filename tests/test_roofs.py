"""bench.roofs: the FLOP and byte counts that state timings against the machine's roofs, and the roof
measurement's arithmetic."""

import pytest
import torch

from bench import roofs


def test_ir50_forward_counts_the_literatures_6_31_gmac():
    """IR-50 at 112 px: 6.31 GMAC per image (what InsightFace's model zoo and the issue quote), linear in B."""
    one = roofs.forward_flops("ir50_cbam", batch=1)
    assert one / 2 == pytest.approx(6.31e9, rel=1e-3)
    assert roofs.forward_flops("ir50_cbam", batch=3) == 3 * one


def test_step_counts_teacher_forward_and_student_forward_and_backward():
    """The student's backward is about twice its forward (input and weight gradients; the stem's input gradient
    is not computed), plus the head's Linear three times; the teacher runs one forward."""
    batch, classes = 4, 10
    fwd = roofs.forward_flops("ir_tiny_cbam", batch=batch)
    step = roofs.step_flops("ir_tiny_cbam", batch, classes)
    head = 2 * batch * 512 * classes
    assert step["teacher"] == fwd and step["total"] == step["teacher"] + step["student"]
    assert 2.8 * fwd < step["student"] - 3 * head <= 3 * fwd


def test_mm_and_conv_counts_match_the_flop_counter():
    """The written-out counts of the compute roof's kernels against torch.utils.flop_counter (meta tensors)."""
    with torch.device("meta"):
        a, b = torch.empty(48, 48), torch.empty(48, 48)
        x, conv = torch.empty(2, 16, 9, 9), torch.nn.Conv2d(16, 16, 3, padding=1, bias=False)
        assert roofs.count_flops(lambda: torch.mm(a, b)) == roofs.mm_flops(48) == 2 * 48**3
        assert roofs.count_flops(lambda: conv(x)) == roofs.conv3x3_flops(2, 16, 9) == 2 * 2 * 16 * 81 * 16 * 9


def test_byte_counts():
    assert roofs.copy_bytes(10, 4) == 80
    n, maps = 2 * 8 * 5 * 5, 2 * (8 + 25)
    assert roofs.cbam_bytes(2, 8, 5, 4, backward=False) == 4 * (2 * n + maps)
    assert roofs.cbam_bytes(2, 8, 5, 2, backward=True) == 2 * (5 * n + 2 * maps)
    maps = [(torch.zeros(3, 4), torch.zeros(3, 1, 2, 2))]
    assert roofs.distill_bytes(maps) == 3 * 4 * (12 + 12)


def test_measure_reports_rates_from_work_over_time(monkeypatch):
    """A rate is the work over the best time: with the clock replaced by one that advances 0.5 s per reading,
    every call takes 0.5 s, so the mm of n=256 runs at mm_flops(256) / 0.5 s and the copy at its bytes / 0.5 s."""
    clock = iter(range(10**6))
    monkeypatch.setattr(roofs.time, "perf_counter", lambda: 0.5 * next(clock))
    monkeypatch.setattr(roofs, "native_bf16", lambda device: False)
    r = roofs.measure("cpu", small=True)
    assert r["float32"]["tried"]["mm n=256"] == pytest.approx(roofs.mm_flops(256) / 0.5 / 1e9)
    assert r["float32"]["gflops"] == max(r["float32"]["tried"].values())
    assert r["copy"]["gbs"] == pytest.approx(roofs.copy_bytes(r["copy"]["numel"], 4) / 0.5 / 1e9)
    assert "no native bf16" in r["bfloat16"]["not_measured"] and r["threads"] == torch.get_num_threads()


@pytest.mark.skipif(not roofs.native_bf16("cpu"), reason="this CPU has no native bf16 (AVX512-BF16 or AMX)")
def test_measure_takes_the_bf16_roof_where_the_cpu_has_it():
    r = roofs.measure("cpu", small=True)
    assert r["bfloat16"]["gflops"] > 0
