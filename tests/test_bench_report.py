"""``python -m bench.report``: ratios, the training-step columns, the profile tables, the roofline and the PNG
chart."""

import json
import sys

import pytest

from bench import report


def bench(group, impl, median, **extra):
    """One pytest-benchmark entry; the training step names its set-up "setup", the kernels "impl"."""
    params = {"setup" if group.startswith("train step") else "impl": impl}
    return {"group": group, "params": params, "stats": {"median": median}, "extra_info": extra}


@pytest.fixture
def results(tmp_path):
    step = "train step B=64 ir_tiny_cbam (amp set-ups: autocast off, channels_last)"
    profile = [["aten::mkldnn_convolution", 300.0, 40.0, 67], ["askd::cbam_forward", 5.5, 0.7, 8]]
    data = {
        "machine_info": {"device": "cpu: test", "torch": "2.13.0", "cpu_model": "test", "threads": 2, "roofs": {
            "float32": {"gflops": 400.0, "by": "conv3x3 B=32 C=256 H=28 channels_last"},
            "bfloat16": {"not_measured": "this CPU has no native bf16"},
            "copy": {"gbs": 20.0, "numel": 1024}, "threads": 2}},
        "datetime": "2026-12-01",
        "benchmarks": [
            bench("cbam fwd B=32 C=64 H=W=56", "eager", 0.040),
            bench("cbam fwd B=32 C=64 H=W=56", "compile", 0.020),
            bench("cbam fwd B=32 C=64 H=W=56", "ext", 0.010, bytes=10**8),
            bench("cbam fwd B=32 C=128 H=W=28", "eager", 0.090),
            bench("cbam fwd B=32 C=128 H=W=28", "compile", 0.030),
            bench("cbam fwd B=32 C=128 H=W=28", "ext", 0.010),
            bench(step, "eager", 0.8, images_per_step=64, peak_mb=300.0, profile=profile, eager_between_s=0.8),
            bench(step, "fused", 0.4, images_per_step=64, peak_mb=250.0, profile=profile, eager_between_s=0.9,
                  flops=64 * 10**9, dtype="float32"),
            bench(step, "a_new_setup", 0.2, images_per_step=64, peak_mb=200.0, eager_between_s=0.8),
        ],
    }
    path = tmp_path / "cpu.json"
    path.write_text(json.dumps(data))
    return path


def test_report_ratios_step_columns_and_profiles(results):
    text = report.report(results, "pytest bench/")
    # ext over eager: 4x and 9x, geometric mean 6x; over compile: 2x and 3x -> sqrt(6) = 2.45x
    assert "| cbam fwd | ext | 6.00x | 2.45x | 2 |" in text
    assert "| fused | 400.000 | 2.00x | nanx | nan | 160.0 | 250 | 2.25x | nanx |" in text  # images/s = 64 / 0.4 s
    # interleaved: the eager steps between fused's rounds took 0.9 s, so 0.9 / 0.4
    assert "| train step, interleaved | fused | 2.25x | nanx | 1 |" in text
    assert "## Where the time goes" in text and "| `askd::cbam_forward` | 5.5 | 0.7 | 8 |" in text
    assert "| train step | a_new_setup | 4.00x | nanx | 1 |" in text  # a set-up the report does not know is kept


def test_report_writes_markdown_and_png(results, monkeypatch):
    pytest.importorskip("matplotlib", reason="the PNG chart needs matplotlib")
    monkeypatch.setattr(sys, "argv", ["bench.report", str(results)])
    report.main()
    assert results.with_suffix(".md").read_text().startswith("# askd benchmarks: cpu: test")
    assert results.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_roofline_states_each_figure_against_its_roof(results):
    text = report.report(results, "pytest bench/")
    assert "| compute float32 | 400.0 GFLOP/s | conv3x3 B=32 C=256 H=28 channels_last |" in text
    assert "| compute bfloat16 | not measured | this CPU has no native bf16 |" in text
    # 64 GFLOP in 0.4 s = 160 GFLOP/s, 40% of 400; 1e8 bytes in 10 ms = 10 GB/s, 50% of 20
    assert "| fused | 160.0 GFLOP/s | 40.0% |" in text
    assert "| cbam fwd B=32 C=64 H=W=56 | ext | 10.0 GB/s | 50.0% |" in text


def test_roofline_of_a_json_without_roofs(results):
    data = json.loads(results.read_text())
    del data["machine_info"]["roofs"]
    results.write_text(json.dumps(data))
    assert "No roofs in this JSON" in report.report(results, "pytest bench/")
