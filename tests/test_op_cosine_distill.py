"""The fused A-SKD loss (:mod:`askd.ops.cosine_distill`) on every backend and device against its references.

The contract (``cosine_distill_forward_ref`` / ``cosine_distill_backward_ref``): loss, statistics and every student
gradient for float64 / float32 (tight) and bfloat16 / float16 (``op_cases.TOL``), B = 1 and several, rows of 1 to
3136 values, the eps branch (a zero teacher or student row), 130 maps (more than the CUDA kernel's parameter table
holds), determinism, an empty batch (an error in every backend) and NaN rows. The public op and
``attention_distill_loss`` against the formula (``cosine_distill_ref``) and the torch backend: the upstream
gradient (ext computes the gradients in the forward pass on a CPU), no gradient for the teacher, fp64 gradcheck,
non-contiguous and mixed-dtype maps, NaN positions. ``torch.library.opcheck`` of the registered ops, the compiled
extension's own error messages, and the Triton kernels compiled for a GPU.

Cases run as (backend, device), see tests/op_cases.py.
"""

from __future__ import annotations

import pytest
import torch
from op_cases import (
    ALL,
    DTYPES,
    EXT,
    FUSED,
    NAN,
    assert_close,
    assert_kernels_compile_for_a_gpu,
    assert_same_nans,
    interpreted,
)

from askd.losses import attention_distill_loss
from askd.ops.cosine_distill import (
    backend_impl,
    cosine_distill,
    cosine_distill_backward_ref,
    cosine_distill_forward_ref,
    cosine_distill_ref,
    fused_cosine_distill,
    fused_cosine_distill_backward,
    grads_in_forward,
)

pytestmark = pytest.mark.usefixtures("no_tf32")

# a map's shape after the batch dim: channel maps (C,) and spatial maps (1,H,W) as A-SKD's, one value a row, 513
# (one past a block) and 56x56 (several blocks a row)
MAP_SHAPES = [(64,), (1, 56, 56), (512,), (1, 7, 7), (5,), (1, 1, 1), (13,), (1, 7, 5), (3,), (1,), (513,), (128,)]
BLOCK = [(6,), (1, 2, 2)]  # one CBAM block's (channel, spatial) maps


def maps(B, device, dtype=torch.float32, shapes=MAP_SHAPES, seed=0):
    """Teacher and student maps, (B, *shape) for each of ``shapes``."""
    g = torch.Generator().manual_seed(seed)
    teacher, student = ([torch.randn(B, *s, generator=g).to(device, dtype) for s in shapes] for _ in range(2))
    return teacher, student


def check_contract(backend, teacher, student, weight):
    """``backend``'s forward (loss, stats) and backward (one gradient per student map) against the references."""
    impl = backend_impl(backend)
    want = cosine_distill_forward_ref(teacher, student, weight)
    for name, g, w in zip(("loss", "stats"), impl.forward(teacher, student, weight), want, strict=True):
        assert_close(name, g, w)
    # both backwards get the reference's statistics: the backward is checked on its own
    args = (torch.tensor(1.3, dtype=want[0].dtype, device=want[0].device), teacher, student, want[1], weight)
    for j, (g, w) in enumerate(zip(impl.backward(*args), cosine_distill_backward_ref(*args), strict=True)):
        assert_close(f"d student {j}", g, w)


def loss_and_grads(fn, teacher, student, upstream=1.0):
    """fn(teacher, student) and the student gradients of ``upstream`` times it."""
    leaves = [s.detach().clone().requires_grad_() for s in student]
    loss = fn(teacher, leaves)
    return (loss, *torch.autograd.grad(upstream * loss, leaves))


def pairs(block_maps):
    """[channel, spatial, channel, ...] -> the (channel, spatial) pairs attention_distill_loss takes."""
    return list(zip(block_maps[::2], block_maps[1::2], strict=True))


def askd_loss(backend, variant="official"):
    """attention_distill_loss through ``backend`` (weight 5) as a function of the flat map lists."""
    return lambda t, s: attention_distill_loss(pairs(t), pairs(s), variant, 5.0, backend=backend)


# ---------------------------------------------------------------------------------------------------------------
# the contract


@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@ALL
def test_matches_contract(backend, device, dtype, B):
    teacher, student = maps(B, device, dtype)
    teacher[4][-1] = 0  # the eps branch: a zero teacher row
    if dtype != torch.float16:
        student[6][0] = 0  # |s| = 0 takes it too; its gradient t / eps overflows float16
    check_contract(backend, teacher, student, 0.7)


@ALL
def test_many_maps_match_contract(backend, device):
    # more maps than fit in the CUDA kernel's parameters (96): its table goes through one host-to-device copy
    teacher, student = maps(3, device, shapes=[(17 + j % 5,) for j in range(130)])
    check_contract(backend, teacher, student, 1.0)


@ALL
def test_forward_is_deterministic(backend, device):
    teacher, student = maps(8, device)
    impl = backend_impl(backend)
    first = impl.forward(teacher, student, 1.0)
    for _ in range(3):
        again = impl.forward(teacher, student, 1.0)
        assert torch.equal(again[0], first[0]) and torch.equal(again[1], first[1])


@ALL
def test_empty_batch_raises(backend, device):
    teacher, student = maps(0, device, shapes=BLOCK)
    message = "the distillation loss needs at least one sample, got batch size 0"
    with pytest.raises(ValueError, match=message):
        askd_loss(backend)(teacher, student)
    with pytest.raises(ValueError, match=message):
        cosine_distill(teacher, student, 5.0, backend)
    if backend != "torch":  # the torch backend's forward is the written-out reference: checked before dispatch only
        with pytest.raises(RuntimeError if backend == "ext" else ValueError, match=message):
            backend_impl(backend).forward(teacher, student, 5.0)


def nan_maps(device, where: str):
    teacher, student = maps(3, device, shapes=BLOCK)
    if where in ("student", "both"):
        student[0][1, 2] = NAN
    if where in ("teacher", "both"):
        teacher[1][2, 0, 1, 1] = NAN
    return teacher, student


@pytest.mark.parametrize("where", ["student", "teacher", "both"])
@ALL
def test_nan_rows_match_autograd(backend, device, where):
    teacher, student = nan_maps(device, where)
    want = loss_and_grads(askd_loss("torch"), teacher, student, upstream=2.0)
    impl = backend_impl(backend)
    loss, stats = impl.forward(teacher, student, 5.0)
    assert_same_nans("loss", loss, want[0])
    got = impl.backward(torch.tensor(2.0, device=device), teacher, student, stats, 5.0)
    for j, (g, w) in enumerate(zip(got, want[1:], strict=True)):
        assert_same_nans(f"d student {j}", g, w)


# ---------------------------------------------------------------------------------------------------------------
# the public op and attention_distill_loss


@pytest.mark.parametrize("upstream", [1.0, -2.5])  # 1.0: ext on a CPU hands the forward's gradients over as they are
@ALL
def test_public_op_matches_formula(backend, device, upstream):
    assert grads_in_forward(backend, torch.device(device)) == (backend == "ext" and device == "cpu")
    teacher, student = maps(2, device, shapes=MAP_SHAPES[:5])
    got = loss_and_grads(lambda t, s: cosine_distill(t, s, 0.25, backend), teacher, student, upstream)
    want = loss_and_grads(lambda t, s: cosine_distill_ref(t, s, 0.25), teacher, student, upstream)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert_close(f"output {i}", g, w)


@pytest.mark.parametrize("variant", ["official", "paper"])
@FUSED
def test_attention_distill_loss_matches_torch(backend, device, variant):
    teacher, student = maps(4, device, shapes=[(16,), (1, 8, 8), (32,), (1, 4, 4)])
    want, got = (loss_and_grads(askd_loss(name, variant), teacher, student) for name in ("torch", backend))
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert_close(f"output {i}", g, w)


@pytest.mark.parametrize("where", ["student", "teacher", "both"])
@FUSED
def test_attention_distill_loss_nan_positions_match_torch(backend, device, where):
    teacher, student = nan_maps(device, where)
    want, got = (loss_and_grads(askd_loss(name), teacher, student) for name in ("torch", backend))
    for name, g, w in zip(("loss", "d channel map", "d spatial map"), got, want, strict=True):
        assert_same_nans(name, g, w)
    assert want[1].isnan().any(dim=1).sum() == (where != "teacher")  # whole rows, in PyTorch too


@ALL
def test_teacher_gets_no_gradient_and_gradcheck(backend, device):
    teacher, student = maps(2, device, torch.float64, shapes=[(5,), (1, 3, 3)])
    teacher, student = [t.requires_grad_() for t in teacher], [s.requires_grad_() for s in student]
    cosine_distill(teacher, student, 5.0, backend).backward()
    assert all(t.grad is None for t in teacher) and all(s.grad is not None for s in student)
    fast = interpreted(backend, device)  # the interpreter is slow: one random projection of the Jacobian there
    assert torch.autograd.gradcheck(lambda *s: cosine_distill(teacher, list(s), 5.0, backend), student, fast_mode=fast)


@ALL
def test_public_op_takes_non_contiguous_maps(backend, device):
    teacher, student = maps(4, device, shapes=[(6, 5), (1, 7, 5)])
    teacher, student = [t.transpose(-1, -2) for t in teacher], [s.transpose(-1, -2) for s in student]
    got = loss_and_grads(lambda t, s: cosine_distill(t, s, 1.0, backend), teacher, student)
    want = loss_and_grads(lambda t, s: cosine_distill_ref(t, s, 1.0), teacher, student)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert_close(f"output {i}", g, w)


@ALL
def test_public_op_casts_mixed_dtypes(backend, device):
    teacher, student = maps(2, device, shapes=[(4,), (3,)])
    student[1] = student[1].double()
    got = cosine_distill(teacher, student, 5.0, backend)
    assert got.dtype == torch.float64
    assert_close("loss", got, cosine_distill_ref([t.double() for t in teacher], [s.double() for s in student], 5.0))


@ALL
def test_opcheck(backend, device):
    teacher, student = maps(2, device, shapes=MAP_SHAPES[:3])
    stats = cosine_distill_forward_ref(teacher, student, 5.0)[1]
    backward_args = (torch.ones((), device=device), teacher, student, stats, 5.0)
    for with_grad in (False, True):  # autograd lives in an autograd.Function around the op, not on it
        torch.library.opcheck(fused_cosine_distill, (teacher, student, 5.0, backend, with_grad))
    if backend != "ext":
        torch.library.opcheck(fused_cosine_distill_backward, (*backward_args, backend))
        return
    torch.library.opcheck(torch.ops.askd.cosine_distill_forward.default, (teacher, student, 5.0))
    torch.library.opcheck(torch.ops.askd.cosine_distill_backward.default, backward_args)
    if device == "cpu":  # the forward with gradients is a CPU kernel only
        torch.library.opcheck(torch.ops.askd.cosine_distill_forward_grad.default, (teacher, student, 5.0))


# ---------------------------------------------------------------------------------------------------------------
# the compiled extension's own checks, and the Triton kernels' compilation


@EXT
def test_ext_takes_non_contiguous_maps(backend, device):
    # the compiled ops read strided maps themselves (the Triton kernels need the public op's contiguous copy)
    teacher, student = maps(4, device, shapes=[(6, 5)])
    check_contract("ext", [teacher[0].transpose(1, 2)], [student[0].transpose(1, 2)], 1.0)


def both(change):
    """The same change to the teacher's maps and the student's."""
    return lambda t, s: (change(t), change(s))


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda t, s: (t[:1], s), "need as many teacher as student maps"),
        (lambda t, s: (t[:1], [s[0][:, :3]]), r"map 0: teacher shape \(2,4\) != student shape \(2,3\)"),
        (both(lambda m: [m[0], m[1].repeat(2, 1)[:3]]), r"map 1: expected shape \(B=2, ...\), got \(3,4\)"),
        (lambda t, s: (t, [s[0], s[1].double()]), r"map 1: all maps must share one dtype \(Float\)"),
        (both(lambda m: [x.long() for x in m]), "maps must be float32, float64, bfloat16 or float16, got Long"),
    ],
    ids=["count", "shape", "batch", "mixed-dtypes", "int"],
)
@EXT
def test_ext_rejects_bad_maps(backend, device, change, message):
    # the public op checks (and casts mixed dtypes) before dispatch; the compiled op checks again itself
    teacher, student = change(*maps(2, device, shapes=[(4,), (4,)]))
    with pytest.raises(RuntimeError, match=message):
        torch.ops.askd.cosine_distill_forward(teacher, student, 5.0)


def test_triton_kernels_compile_for_a_gpu(tmp_path):
    assert_kernels_compile_for_a_gpu("askd.kernels.cosine_distill", 2, tmp_path)
