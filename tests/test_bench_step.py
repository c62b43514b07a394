"""``python -m bench.step``: which convolutions it times, their FLOP counts, the profile split and the report's
arithmetic (the timing itself is a benchmark, not a test)."""

from types import SimpleNamespace

import pytest
import torch

from bench import roofs, step


def test_the_convolutions_are_the_forwards_flops():
    """IR-50's conv layers as the step runs them carry all of a forward's FLOPs but CBAM's and the embedding's."""
    layers = step.conv_layers("ir50_cbam", batch=2)
    flops = 0
    for (shape, cin, cout, k, stride, pad), n in layers.items():
        assert shape[0] == 2
        side = (shape[2] + 2 * pad - k) // stride + 1
        flops += n * 2 * shape[0] * cout * side * side * cin * k * k
    assert sum(layers.values()) == 53  # the stem, 24 blocks x 2, 4 shortcuts
    assert 0.995 < flops / roofs.forward_flops("ir50_cbam", batch=2) < 1


@pytest.mark.parametrize("cin", [3, 4])
def test_one_layer_timed_alone(cin):
    """FLOPs of a 3x3 stride-2 layer; its backward is twice that, once for the stem (no input gradient)."""
    t = step.time_layer((2, cin, 9, 9), cin, 6, 3, 2, 1)
    assert t["flops"] == 2 * 2 * 6 * 5 * 5 * cin * 9
    assert t["backward_flops"] == t["flops"] * (1 if cin == 3 else 2)
    assert t["forward_s"] > 0 and t["forward_gflops"] == pytest.approx(t["flops"] / t["forward_s"] / 1e9)


def test_profile_split_into_parts():
    events = [("aten::mkldnn_convolution", 50), ("aten::convolution_backward", 30), ("aten::native_batch_norm", 5),
              ("aten::native_batch_norm_backward", 5), ("askd::prelu_backward", 4), ("aten::_prelu_kernel", 2),
              ("askd::cbam_forward", 2), ("aten::add_", 2)]  # fmt: skip
    prof = SimpleNamespace(key_averages=lambda: [SimpleNamespace(key=k, self_cpu_time_total=t) for k, t in events])
    assert step.split(prof) == {"conv forward": 0.5, "conv backward": 0.3, "BatchNorm": 0.1, "PReLU": 0.06,
                                "CBAM": 0.02, "other": 0.02}  # fmt: skip


def test_report_states_each_step_against_the_roof_and_the_conv_ceiling():
    layer = {"input": [4, 64, 56, 56], "in": 64, "out": 64, "kernel": 3, "stride": 1, "count": 2,
             "forward_gflops": 150.0, "backward_gflops": 100.0}  # fmt: skip
    result = {
        "arch": "ir50_cbam", "batch": 4, "machine": "test cpu", "command": "python -m bench.step", "torch": "2.13",
        "threads": 2, "malloc": "malloc as glibc's default", "step_flops": 400e9,
        "roofs": {"float32": {"gflops": 200.0, "by": "conv"}, "copy": {"gbs": 30.0}},
        "conv_alone": {"seconds": 2.5, "layers": [layer]},  # a ceiling of 160 GFLOP/s: 80% of the roof
        "steps": {"eager": {"median_s": 8.0, "faults_per_step": 1000},
                  "fused": {"median_s": 4.0, "faults_per_step": 0}},
        "split": {"eager": {"conv forward": 0.6, "other": 0.4}, "fused": {"conv forward": 0.9, "other": 0.1}},
    }  # fmt: skip
    text = step.report(result)
    assert "take 2.50 s: 160.0 GFLOP/s, 80% of the roof" in text
    assert "| eager | 8.00 | 0.50 | 1.00x | 50.0 | 25% | 31% | 1,000 |" in text
    assert "| fused | 4.00 | 1.00 | 2.00x | 100.0 | 50% | 62% | 0 |" in text
    assert "| conv forward | 60.0% | 90.0% |" in text
    assert "| (64, 56, 56) | 64 -> 64 | 3/1 | 2 | 150 | 100 |" in text


def test_inference_batches_run_a_frozen_model_without_autograd(monkeypatch):
    seen = []
    monkeypatch.setattr(torch.nn.Module, "__call__", _recording(torch.nn.Module.__call__, seen), raising=True)
    step.inference_step("ir_tiny_cbam", batch=2)()
    _, x, grad_mode, training = seen[0]
    assert x.shape == (2, 3, 112, 112) and not grad_mode and not training


def _recording(call, seen):
    def wrapper(module, *args, **kwargs):
        if not seen:
            seen.append((module, args[0], torch.is_grad_enabled(), module.training))
        return call(module, *args, **kwargs)

    return wrapper
