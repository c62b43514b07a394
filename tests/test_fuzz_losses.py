"""Fuzzing the distillation losses: every public loss function of ``askd.losses`` and every method of its registry.

Hypothesis draws the inputs as tests/test_fuzz_ops.py does (its strategies): B = 0, 1, 2 and more, odd and prime
sizes, the four float dtypes and refused ones, layouts, a NaN or an infinity, and one defect at a time (a
mismatched shape, batch, list or pair, a wrong rank, dtype or device, what is no tensor, labels out of range). The
test knows the outcome before the call:

- valid input: the loss is a 0-d tensor in its compute dtype (float32, float64 for float64 students) equal to the
  same function on contiguous copies in that dtype (so neither the layout nor a low-precision input changes it),
  finite exactly when its inputs are, with a gradient for the student only; the A-SKD loss through every backend
  that runs here equals the torch one, and every method's terms are the same with the fused kernels and without;
- a defect: a ValueError (a TypeError for what is no tensor) whose message names the problem.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
import torch
from hypothesis import event, example, given, settings
from hypothesis import strategies as st
from op_cases import assert_close, backend_params
from test_fuzz_ops import (
    BATCHES,
    FLOATS,
    NOT_TENSORS,
    REFUSED,
    SIZES,
    TINY,
    Case,
    assert_close_to_truth,
    expect_error,
    leaf,
    tensors,
    term_size,
)

from askd.config import Config
from askd.losses import (
    Outputs,
    at_cos_loss,
    at_loss,
    attention_distill_loss,
    build,
    fkd_loss,
    horkd_loss,
    kd_loss,
    registry,
    rkd_angle,
    rkd_distance,
    rkd_loss,
)
from askd.losses.checks import compute_dtype


def tree(fn: Callable[[torch.Tensor], object], obj):
    """``fn`` applied to every tensor in ``obj`` (a tensor, or lists and tuples of them, nested)."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, (list, tuple)):
        return type(obj)(tree(fn, o) for o in obj)
    return obj


def flat(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    return [t for o in obj for t in flat(o)] if isinstance(obj, (list, tuple)) else []


def finite(obj) -> bool:
    return all(t.isfinite().all() for t in flat(obj))


def dtypes(draw) -> tuple[torch.dtype, torch.dtype]:
    """Teacher and student dtypes: mostly one, sometimes two (the losses compute in the student's)."""
    base = draw(st.sampled_from(FLOATS))
    return base, draw(st.one_of(st.just(base), st.sampled_from(FLOATS)))


# ---------------------------------------------------------------------------------------------------------------
# the oracle of a valid call


def check_loss(fn: Callable, case: Case) -> None:
    """``fn(teacher, student, *extra)`` for ``case.args = [teacher, student, *extra]`` (tensors or lists of them):
    the error the case expects, or a 0-d loss equal to ``fn`` of contiguous copies in each input's compute dtype,
    finite exactly when the inputs are, whose gradient reaches the student (like it, as the copies' gradient) and
    not the teacher."""
    if case.error:
        expect_error(case, lambda: fn(*case.args))
        return
    teacher, student, *extra = case.args
    t, s = (tree(leaf, v) for v in (teacher, student))
    got = fn(t, s, *extra)
    ref_t, ref_s = (tree(lambda x: x.detach().to(compute_dtype(x)).contiguous().requires_grad_(), v)
                    for v in (teacher, student))
    want = fn(ref_t, ref_s, *extra)
    assert got.shape == () and got.dtype == want.dtype, f"loss {got.shape} {got.dtype}, expected () {want.dtype}"
    # a float32 input's rounding (summation order in its layout) limits a float64 result: compare at float32 then
    precision = max((compute_dtype(x) for x in flat([teacher, student])), key=lambda d: torch.finfo(d).eps,
                    default=torch.float64)

    def compared(d: torch.dtype) -> torch.dtype:
        return d if torch.finfo(d).eps > torch.finfo(precision).eps else precision

    assert_close("loss", got.to(compared(got.dtype)), want.to(compared(got.dtype)))
    assert bool(got.isfinite()) == finite([teacher, student]), f"loss {got} for inputs finite: {finite(case.args)}"
    grads = torch.autograd.grad(got, flat(t) + flat(s), allow_unused=True)
    assert all(g is None for g in grads[: len(flat(t))]), "the teacher got a gradient"
    wgrads = torch.autograd.grad(want, flat(ref_s))
    for i, (g, w, x) in enumerate(zip(grads[len(flat(t)):], wgrads, flat(s), strict=True)):
        assert_close(f"d student {i}", g.to(compared(x.dtype)), w.to(compared(x.dtype)))


# ---------------------------------------------------------------------------------------------------------------
# embedding and logit losses: (B,E) pairs

# name -> (function, the name its messages give, the smallest batch it takes)
PAIR_LOSSES = {
    "fkd_loss": (fkd_loss, "fkd_loss", 1),
    "kd_loss": (kd_loss, "kd_loss", 1),
    "rkd_distance": (rkd_distance, "rkd_distance", 2),
    "rkd_angle": (rkd_angle, "rkd_angle", 2),
    "rkd_loss": (rkd_loss, "rkd_distance", 2),
}
PAIR_DEFECTS = ("not-tensor", "rank", "dtype", "shape", "device", "empty")


@st.composite
def pair_cases(draw, fn: str, min_batch: int):
    """A Case ``[teacher, student]`` of one (B,E) pair for loss ``fn`` (as its messages name it), valid or with one
    defect; too small a batch is a defect of its own."""
    B, E = draw(st.sampled_from(BATCHES)), draw(st.sampled_from(SIZES))
    dt, ds = dtypes(draw)
    case = Case([draw(tensors((B, E), dt)), draw(tensors((B, E), ds))])
    defect = draw(st.one_of(st.none(), st.sampled_from(PAIR_DEFECTS)))
    event(f"defect: {defect}")
    i, who = draw(st.sampled_from(((0, "teacher"), (1, "student"))))
    x = case.args[i]
    if defect == "not-tensor":
        case.args[i] = draw(st.sampled_from(NOT_TENSORS))
        case.refuse(TypeError, rf"{fn}: {who} input must be a tensor")
    elif defect in ("rank", "dtype"):
        case.args[i] = x.flatten() if defect == "rank" else x.to(draw(st.sampled_from(REFUSED)))
        case.refuse(ValueError, rf"{fn}: expected a floating-point 2-d {who} tensor")
    elif defect == "shape":
        case.args[1] = torch.cat([case.args[1], case.args[1][:, :1]], dim=1)
        case.refuse(ValueError, rf"{fn}: teacher \(.*\) != student \(.*\)")
    elif defect == "device":
        case.args[0] = case.args[0].to("meta")
        case.refuse(ValueError, rf"{fn}: teacher on meta, student on cpu")
    elif defect == "empty":
        case.args[:2] = (v[:, :0] for v in case.args[:2])
        case.refuse(ValueError, rf"{fn}: every dim but the batch must be > 0")
    if defect in (None, "empty") and B < min_batch:  # checked before the empty dims
        case.refuse(ValueError, rf"{fn}: needs a batch of at least {min_batch} samples, got {B}")
    return case


@pytest.mark.parametrize("name", PAIR_LOSSES)
@settings(max_examples=30)
@given(data=st.data())
def test_pair_losses(name, data):
    fn, fn_name, min_batch = PAIR_LOSSES[name]
    case = data.draw(pair_cases(fn_name, min_batch))
    if name == "kd_loss":  # and its temperature
        temperature = data.draw(st.sampled_from((4.0, 0.5, 0.0, -1.0, float("nan"))))
        case.args.append(temperature)
        if not temperature > 0 and case.error is None:
            case.refuse(ValueError, r"kd_loss: temperature must be > 0")
    check_loss(fn, case)


# found by the fuzzing: kd_loss took anything (B = 0 gave NaN, 1-d logits an IndexError, integer logits a number, no
# classes 0, a temperature <= 0 NaN or a sign-flipped loss); F-KD and HORKD gave NaN for empty embeddings, RKD 0
PAIR_REGRESSIONS = {
    "kd-empty-batch": (kd_loss, [torch.zeros(0, 5), torch.zeros(0, 5), 4.0], "needs a batch of at least 1"),
    "kd-1d": (kd_loss, [torch.zeros(5), torch.zeros(5), 4.0], "expected a floating-point 2-d teacher tensor"),
    "kd-int": (kd_loss, [torch.ones(2, 5).long(), torch.ones(2, 5), 4.0], "expected a floating-point 2-d teacher"),
    "kd-no-classes": (kd_loss, [torch.zeros(2, 0), torch.zeros(2, 0), 4.0], "every dim but the batch must be > 0"),
    "kd-temperature": (kd_loss, [torch.zeros(2, 5), torch.zeros(2, 5), -1.0], "temperature must be > 0, got -1.0"),
    "fkd-empty": (fkd_loss, [torch.zeros(3, 0), torch.zeros(3, 0)], "every dim but the batch must be > 0"),
    "rkd-empty": (rkd_loss, [torch.zeros(3, 0), torch.zeros(3, 0)], "every dim but the batch must be > 0"),
}


@pytest.mark.parametrize("fn,args,message", PAIR_REGRESSIONS.values(), ids=list(PAIR_REGRESSIONS))
def test_pair_loss_regressions(fn, args, message):
    check_loss(fn, Case(args, (ValueError, re.escape(message))))


# ---------------------------------------------------------------------------------------------------------------
# attention transfer: lists of stage outputs (B,C,H,W), the channel counts of teacher and student free

STAGE_DEFECTS = ("not-list", "count", "no-stages", "not-tensor", "rank", "dtype", "spatial", "batch", "device",
                 "empty")


@st.composite
def stage_cases(draw, fn: str):
    """A Case ``[teacher stages, student stages]`` for ``fn`` (at_loss, at_cos_loss), valid or with one defect."""
    B, S = draw(st.sampled_from(BATCHES)), draw(st.integers(1, 3))
    teacher, student = [], []
    for _ in range(S):
        H, W, Ct, Cs = (draw(st.sampled_from(SIZES)) for _ in range(4))
        dt, ds = dtypes(draw)
        teacher.append(draw(tensors((B, Ct, H, W), dt, poison=0.1)))
        student.append(draw(tensors((B, Cs, H, W), ds, poison=0.1)))
    case = Case([teacher, student])
    # the lists are checked before the stages, stage 0 (and its batch) before the others
    defect = draw(st.one_of(st.none(), st.sampled_from(STAGE_DEFECTS if B else STAGE_DEFECTS[:3])))
    event(f"defect: {defect}")
    j, (i, who) = draw(st.integers(0, S - 1)), draw(st.sampled_from(((0, "teacher"), (1, "student"))))
    where = rf"{fn} stage {j}:"
    if defect == "not-list":
        case.args[i] = case.args[i][0]
        case.refuse(TypeError, rf"{fn}: expected lists of stage outputs")
    elif defect in ("count", "no-stages"):
        case.args[:2] = (teacher, student[:-1]) if defect == "count" else ([], [])
        case.refuse(ValueError, rf"{fn}: teacher and student must give the same non-zero number of stage outputs")
    elif defect == "not-tensor":
        case.args[i][j] = draw(st.sampled_from(NOT_TENSORS))
        case.refuse(TypeError, rf"{where} {who} input must be a tensor")
    elif defect in ("rank", "dtype"):
        x = case.args[i][j]
        case.args[i][j] = x.flatten(2) if defect == "rank" else x.to(draw(st.sampled_from(REFUSED)))
        case.refuse(ValueError, rf"{where} expected a floating-point 4-d {who} tensor")
    elif defect in ("spatial", "batch"):
        dim = 3 if defect == "spatial" else 0
        student[j] = torch.cat([student[j], student[j].narrow(dim, 0, 1)], dim=dim)
        case.refuse(ValueError, rf"{where} teacher \(.*\) != student \(.*\)")
    elif defect == "device":
        teacher[j] = teacher[j].to("meta")
        case.refuse(ValueError, rf"{where} teacher on meta, student on cpu")
    elif defect == "empty":  # no channels on one side (they may differ), or no pixels on both
        if draw(st.booleans()):
            case.args[i][j] = case.args[i][j][:, :0]
        else:
            teacher[j], student[j] = teacher[j][:, :, :0], student[j][:, :, :0]
        case.refuse(ValueError, rf"{where} every dim but the batch must be > 0")
    if B == 0 and defect is None:
        case.refuse(ValueError, rf"{fn} stage 0: needs a batch of at least 1 samples, got 0")
    return case


@pytest.mark.parametrize("fn", [at_loss, at_cos_loss], ids=lambda f: f.__name__)
@settings(max_examples=30)
@given(data=st.data())
def test_at_losses(fn, data):
    check_loss(fn, data.draw(stage_cases(fn.__name__)))


# found by the fuzzing: a tensor for the list of stages was a bare RuntimeError (its truth value), empty channels or
# maps NaN (at_loss) or 1 (at_cos_loss)
AT_REGRESSIONS = {
    "not-a-list": ([torch.ones(2, 3, 4, 4)], torch.ones(2, 3, 4, 4), TypeError, "expected lists of stage outputs"),
    "no-channels": ([torch.ones(2, 0, 4, 4)], [torch.ones(2, 3, 4, 4)], ValueError, "every dim but the batch"),
    "no-pixels": ([torch.ones(2, 3, 0, 4)], [torch.ones(2, 3, 0, 4)], ValueError, "every dim but the batch"),
}


@pytest.mark.parametrize("fn", [at_loss, at_cos_loss], ids=lambda f: f.__name__)
@pytest.mark.parametrize("teacher,student,kind,message", AT_REGRESSIONS.values(), ids=list(AT_REGRESSIONS))
def test_at_loss_regressions(fn, teacher, student, kind, message):
    check_loss(fn, Case([teacher, student], (kind, re.escape(message))))


# ---------------------------------------------------------------------------------------------------------------
# HORKD: embeddings, labels (B,) and class centres (C,E)

HORKD_DEFECTS = ("labels-range", "labels-dtype", "labels-shape", "labels-device", "centres-shape", "no-centre")


@st.composite
def horkd_cases(draw):
    """A Case ``[teacher, student, labels, centres]``: the embedding pair of :func:`pair_cases`, labels of C classes
    whose centres are known (others may be NaN: not seen yet), valid or with one defect."""
    case = draw(pair_cases("horkd_loss", 2))
    if case.error:  # the pair's own defect comes first
        case.args += [torch.zeros(0, dtype=torch.long), torch.zeros(1, 1)]
        return case
    B, E = case.args[1].shape
    C = draw(st.integers(1, 6))
    labels = torch.tensor([draw(st.integers(0, C - 1)) for _ in range(B)], dtype=draw(st.sampled_from((torch.int64,
                                                                                                       torch.int32))))
    # shifted off the embeddings: a centre on an embedding (what equal seeds draw) sits on the kink of the distance's
    # square root (clamped at 1e-12), where rounding alone decides the gradient
    centres = draw(tensors((C, E), draw(st.sampled_from(FLOATS)), poison=0, layout=False)) + 1.0
    unseen = [c for c in range(C) if c not in labels.tolist()]
    if unseen and draw(st.booleans()):
        centres[unseen[0]] = float("nan")
    case.args += [labels, centres]
    defect = draw(st.one_of(st.none(), st.sampled_from(HORKD_DEFECTS)))
    event(f"labels/centres defect: {defect}")
    if defect == "labels-range":
        case.args[2] = labels + draw(st.sampled_from((C, -C)))
        case.refuse(ValueError, rf"horkd_loss: labels must lie in \[0, {C}\)")
    elif defect in ("labels-dtype", "labels-shape"):
        case.args[2] = labels.float() if defect == "labels-dtype" else labels[:-1]
        case.refuse(ValueError, rf"horkd_loss: labels must be int \(B={B},\)")
    elif defect == "labels-device":
        case.args[2] = labels.to("meta")
        case.refuse(ValueError, r"horkd_loss: labels on meta, embeddings on cpu")
    elif defect == "centres-shape":
        case.args[3] = centres[:, :-1] if draw(st.booleans()) else centres.long()
        case.refuse(ValueError, rf"horkd_loss: centres must be floating \(C,E={E}\)")
    elif defect == "no-centre":
        case.args[3] = centres.clone()
        case.args[3][labels[0]] = float("nan")
        case.refuse(ValueError, r"horkd_loss: a sample's own class has no centre yet")
    return case


@settings(max_examples=40)
@given(case=horkd_cases())
def test_horkd_loss(case):
    check_loss(horkd_loss, case)


# ---------------------------------------------------------------------------------------------------------------
# the A-SKD loss through every backend: lists of (channel (B,C), spatial (B,1,H,W)) pairs, one per CBAM block

BLOCK_DEFECTS = ("count", "no-blocks", "not-pair", "not-list", "shape", "kinds", "variant")


@st.composite
def block_cases(draw, sizes=SIZES, batches=BATCHES, defects=BLOCK_DEFECTS):
    """A Case ``[teacher maps, student maps, variant, weight, kinds]`` for attention_distill_loss, valid or with one
    defect; B = 0 is refused (a mean over the batch)."""
    B, N = draw(st.sampled_from(batches)), draw(st.integers(1, 3))
    dt, ds = dtypes(draw)
    teacher, student = [], []
    for _ in range(N):
        C, H, W = (draw(st.sampled_from(sizes)) for _ in range(3))
        teacher.append((draw(tensors((B, C), dt, 0.1)), draw(tensors((B, 1, H, W), dt, 0.1))))
        student.append((draw(tensors((B, C), ds, 0.1)), draw(tensors((B, 1, H, W), ds, 0.1))))
    kinds = draw(st.sampled_from((("channel", "spatial"), ("spatial",), ("channel",), ("spatial", "channel"))))
    case = Case([teacher, student, draw(st.sampled_from(("official", "paper"))), draw(st.sampled_from((5.0, 0.5))),
                 kinds])
    defect = draw(st.one_of(st.none(), st.sampled_from(defects))) if defects else None
    event(f"defect: {defect}")
    j = draw(st.integers(0, N - 1))
    if defect == "variant":  # checked first
        case.args[2] = "authors"
        case.refuse(ValueError, r"unknown variant 'authors'")
    elif defect in ("count", "no-blocks"):
        case.args[:2] = (teacher, student[:-1]) if defect == "count" else ([], [])
        case.refuse(ValueError, r"teacher and student must give the same non-zero number of CBAM blocks")
    elif defect == "not-pair":
        student[j] = draw(st.sampled_from((student[j][:1], (*student[j], student[j][0]), torch.stack(
            [student[j][0]] * 2))))
        case.refuse(ValueError, rf"block {j}: expected a \(channel_map, spatial_map\) pair from each model")
    elif defect == "not-list":
        case.args[1] = student[0][0]
        case.refuse(TypeError, r"expected a list of \(channel_map, spatial_map\) pairs")
    elif defect == "shape" and B:
        student[j] = (student[j][0], torch.cat([student[j][1], student[j][1][..., :1]], dim=-1))
        case.refuse(ValueError, rf"block {j} spatial map: teacher shape \(.*\) != student shape")
    elif defect == "kinds" and B:
        case.args[4] = draw(st.sampled_from(((), ("channel", "channel"), ("logits",), "channel")))
        case.refuse(ValueError, r"kinds: expected distinct names of \['channel', 'spatial'\]")
    elif B == 0:
        case.refuse(ValueError, "the distillation loss needs at least one sample, got batch size 0")
    return case


def check_attention_distill_loss(case: Case, backend: str) -> None:
    """attention_distill_loss through ``backend``: the error the case expects, or the loss and the student
    gradients of the torch backend (the formula), as tests/test_fuzz_ops.py compares the fused op with it."""
    teacher, student, variant, weight, kinds = case.args

    def loss_and_grads(backend, maps):
        leaves = tree(leaf, maps)
        loss = attention_distill_loss(teacher, leaves, variant, weight, backend, kinds)
        used = [m for pair in leaves for m, kind in zip(pair, ("channel", "spatial"), strict=True) if kind in kinds]
        return [loss, *torch.autograd.grad(loss, used)], used

    if case.error:
        expect_error(case, lambda: attention_distill_loss(teacher, student, variant, weight, backend, kinds))
        return
    got, used = loss_and_grads(backend, student)
    want, _ = loss_and_grads("torch", student)
    truth, _ = loss_and_grads("torch", tree(lambda m: m.double(), student))
    per_map = weight / len(kinds) if variant == "paper" else weight
    sizes = [torch.ones(())] + [term_size(m, per_map) for m in used]
    for i, (g, w, t, size) in enumerate(zip(got, want, truth, sizes, strict=True)):
        assert_close_to_truth("loss" if i == 0 else f"d student map {i - 1}", g, w, t, size)


@pytest.mark.parametrize("backend,device", backend_params(("ext",)))
@settings(max_examples=40)
@given(case=block_cases())
def test_attention_distill_loss(backend, device, case):
    check_attention_distill_loss(case, backend)


@pytest.mark.parametrize("backend,device", backend_params(("triton",)))
@settings(max_examples=6)
@given(case=block_cases(sizes=TINY, batches=(1, 2), defects=()))  # the refusals come before any backend runs
def test_attention_distill_loss_triton(backend, device, case):
    check_attention_distill_loss(case, backend)


# ---------------------------------------------------------------------------------------------------------------
# every method of the registry, on one step's Outputs

# what each method reads of a step's Outputs (AT reads the stage outputs and no embedding: more than ``needs`` says)
READS = {
    "base": set(), "at": {"stages"}, "at_cos": {"stages"}, "fkd": {"emb"}, "rkd": {"emb"}, "horkd": {"emb", "labels"},
    "kd": {"logits"}, "askd": {"channel maps", "spatial maps"}, "askd_sa": {"spatial maps"},
    "askd_ca": {"channel maps"},
}
MIN_BATCH = {"rkd": 2, "horkd": 2}
METHODS = [*registry.names(), "askd+kd"]
# defect -> (what it breaks, the error's type and pattern for a method that reads that)
OUTPUT_DEFECTS = {
    "labels-range": ("labels", ValueError, r"horkd_loss: labels must lie in \[0, \d+\)"),
    "labels-float": ("labels", ValueError, r"horkd_loss: labels must be int"),
    "no-teacher": ("any", (ValueError, TypeError),
                   r"method '[\w+]+' needs .*teacher_\w+.* in its Outputs .* got None|teacher input must be a tensor"),
    "maps-count": ("maps", ValueError, r"same non-zero number of CBAM blocks, got 2 and 1"),
    "emb-shape": ("emb", ValueError, r"teacher \(\d+, \d+\) != student"),
    "logits-shape": ("logits", ValueError, r"kd_loss: teacher \(\d+, \d+\) != student"),
    "stages-count": ("stages", ValueError, r"same non-zero number of stage outputs, got 2 and 1"),
}


@st.composite
def step_outputs(draw):
    """(Outputs of one step, number of classes, defect or None): embeddings (B,E), 2 CBAM blocks' maps, 2 stage
    outputs of free widths, margin logits (B,N) and labels in [0, N), all of one drawn dtype."""
    B, E, N = draw(st.sampled_from(BATCHES)), draw(st.sampled_from(SIZES)), draw(st.sampled_from(SIZES))
    dtype = draw(st.sampled_from(FLOATS))
    blocks = [tuple(draw(st.sampled_from(SIZES)) for _ in range(3)) for _ in range(2)]
    grid = [tuple(draw(st.sampled_from(SIZES)) for _ in range(2)) for _ in range(2)]

    def drawn(shape):
        return draw(tensors(shape, dtype, poison=0.03))

    def maps():
        return [(drawn((B, C)), drawn((B, 1, H, W))) for C, H, W in blocks]

    def stages():
        return [drawn((B, draw(st.sampled_from(SIZES)), H, W)) for H, W in grid]

    labels = torch.tensor([draw(st.integers(0, N - 1)) for _ in range(B)], dtype=torch.long)
    out = Outputs(labels, drawn((B, E)), maps(), drawn((B, N)), teacher_emb=drawn((B, E)), teacher_maps=maps(),
                  student_stages=stages(), teacher_stages=stages(), teacher_logits=drawn((B, N)))
    # B = 0 and B = 1 come alone: what a method checks first differs
    defect = draw(st.one_of(st.none(), st.sampled_from(list(OUTPUT_DEFECTS)))) if B > 1 else None
    event(f"defect: {defect}")
    if defect == "labels-range":
        out.labels = labels.clone()
        out.labels[0] = draw(st.sampled_from((N, -1)))
    elif defect == "labels-float":
        out.labels = labels.float()
    elif defect == "no-teacher":
        out.teacher_emb = out.teacher_maps = out.teacher_stages = out.teacher_logits = None
    elif defect == "maps-count":
        out.student_maps = out.student_maps[:1]
    elif defect == "emb-shape":
        out.teacher_emb = torch.cat([out.teacher_emb, out.teacher_emb[:, :1]], dim=1)
    elif defect == "logits-shape":
        out.teacher_logits = torch.cat([out.teacher_logits, out.teacher_logits[:, :1]], dim=1)
    elif defect == "stages-count":
        out.student_stages = out.student_stages[:1]
    return out, N, defect


def reads(method: str) -> set[str]:
    return set().union(*(READS[m] for m in method.split("+")))


def expected_error(method: str, out: Outputs, defect: str | None) -> tuple[type, str] | None:
    """The error ``method`` must raise on ``out`` with ``defect``, or None where it must give its terms."""
    what, B = reads(method), len(out.student_emb)
    if defect is not None:
        breaks, kind, pattern = OUTPUT_DEFECTS[defect]
        if (breaks == "any" and what) or any(breaks in r for r in what):
            return kind, pattern
    if what and B < max(MIN_BATCH.get(m, 1) for m in method.split("+")):
        return ValueError, rf"(batch|sample).* got( batch size)? {B}"
    if "labels" in what and not finite(out.teacher_emb):  # HORKD keeps the teacher's embeddings in its state
        return ValueError, r"horkd: the teacher's embeddings hold NaN or inf"
    return None


def read_tensors(out: Outputs, method: str, who: str) -> list[torch.Tensor]:
    """The floating tensors of ``who`` (teacher, student) in ``out`` that ``method`` reads."""
    kinds = {"channel maps": 0, "spatial maps": 1}
    return flat([[pair[kinds[r]] for pair in getattr(out, f"{who}_maps")] if r in kinds else
                 getattr(out, f"{who}_{r}") for r in sorted(reads(method) - {"labels"})])


def small_outputs(teacher: bool = True, labels: tuple = (0, 1), nan_teacher_emb: bool = False) -> Outputs:
    """Outputs of B = 2, E = N = 3, two CBAM blocks and two stages; no teacher fields unless ``teacher``."""
    g = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g)

    def maps():
        return [(randn(2, 3), randn(2, 1, 2, 2)) for _ in range(2)]

    out = Outputs(torch.tensor(labels), randn(2, 3), maps(), randn(2, 3), student_stages=[randn(2, 3, 2, 2)] * 2)
    if teacher:
        out.teacher_emb, out.teacher_maps, out.teacher_logits = randn(2, 3), maps(), randn(2, 3)
        out.teacher_stages = [randn(2, 4, 2, 2)] * 2
        if nan_teacher_emb:
            out.teacher_emb[1, 2] = float("nan")
    return out


@pytest.mark.parametrize("method", METHODS)
@settings(max_examples=25)
@given(drawn=step_outputs())
# found by the fuzzing: a method given no teacher fields met None inside its loss: TypeError: object of type
# 'NoneType' has no len() (askd, at), AttributeError (kd); now a ValueError naming the field first
@example(drawn=(small_outputs(teacher=False), 3, "no-teacher"))
# and HORKD took labels out of range and float labels into its class centres before its checks (index_add_'s
# RuntimeError), a NaN teacher embedding into them for good (then "no centre yet" for that class ever after)
@example(drawn=(small_outputs(labels=(0, 3)), 3, "labels-range"))
@example(drawn=(small_outputs(labels=(0.0, 1.0)), 3, "labels-float"))
@example(drawn=(small_outputs(nan_teacher_emb=True), 3, None))
def test_methods(method, drawn):
    assert set(READS) == set(registry.names()), "a new method: say what it reads in READS"
    out, N, defect = drawn
    E = out.student_emb.shape[1]
    error = expected_error(method, out, defect)
    for fused in (False, True):  # the fused kernels (backend auto) and the plain PyTorch modules
        build_method = build(method, Config(embedding_size=E, fused=fused), N)
        if error:
            expect_error(Case([out], error), lambda: build_method(out))  # noqa: B023 (called at once)
            continue
        student, teacher = read_tensors(out, method, "student"), read_tensors(out, method, "teacher")
        for t in (*student, *teacher):
            t.requires_grad_()
        terms = build_method(out)
        if not fused:
            want = terms
            continue
        assert set(terms) == set(want), f"terms {set(terms)} with fused kernels, {set(want)} without"
        for name, value in terms.items():
            assert_close(name, value, want[name])
            part = next(p for p in method.split("+") if name == p or name.startswith(f"{p}_"))  # askd+kd: askd, kd
            inputs = read_tensors(out, part, "student") + read_tensors(out, part, "teacher")
            assert value.shape == () and bool(value.isfinite()) == finite(inputs), (name, value)
        if terms:
            grads = torch.autograd.grad(sum(terms.values()), student + teacher, allow_unused=True)
            assert any(g is not None for g in grads[: len(student)]), "no gradient reached the student"
            assert all(g is None for g in grads[len(student):]), "the teacher got a gradient"
