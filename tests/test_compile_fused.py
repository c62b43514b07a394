"""torch.compile of a student step through the fused ext ops: one graph, no graph break, no recompilation.

The forward of a step of one IR-CBAM block (conv, BN, PReLU, CBAM through backend "ext") and the A-SKD loss
through "ext", compiled with fullgraph=True (its backward then runs as AOTAutograd's compiled backward), run
twice on new data against the same step run eagerly on the reference.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo

from askd import backend
from askd.losses import attention_distill_loss
from askd.nn import IRBlockCBAM

REASON = backend.availability("cpu")["ext"]


@pytest.mark.skipif(REASON is not None, reason=f"ext backend unavailable on cpu: {REASON}")
def test_compiled_student_step_has_one_graph_and_matches_eager():
    torch.manual_seed(0)
    cbam = {"reduction": 4, "spatial_kernel": 3, "maps": "logits"}
    fused = IRBlockCBAM(8, 16, 2, dict(cbam, backend="ext"))
    reference = IRBlockCBAM(8, 16, 2, dict(cbam, backend="torch"))
    reference.load_state_dict(fused.state_dict())

    def step(block, x, teacher_maps, name):
        y, a_c, a_s = block(x)
        return y.square().mean() + attention_distill_loss(teacher_maps, [(a_c, a_s)], backend=name)

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    # inductor's defaults, conv layout optimisation included: with the strided shortcut convolution as oneDNN
    # runs it (before askd.nn.iresnet.PointwiseConv), this block's compiled backward corrupted the heap
    compiled = torch.compile(step, fullgraph=True)
    for seed in (1, 2):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(2, 8, 12, 12, generator=g).contiguous(memory_format=torch.channels_last)
        teacher = [(torch.randn(2, 16, generator=g), torch.randn(2, 1, 6, 6, generator=g))]
        got = compiled(fused, x, teacher, "ext")
        want = step(reference, x, teacher, "torch")
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        got.backward()  # AOTAutograd's compiled backward, through the fused backward ops
        want.backward()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert not torch._dynamo.utils.counters["graph_break"]
    for p, q in zip(fused.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-4)
