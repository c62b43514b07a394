"""The method interface: the registry and its specs, stage outputs only on demand, the step without method
names, and ``python -m askd.train`` with every method of the paper's comparison, HORKD's resume and assistant."""

from __future__ import annotations

import json

import pytest
import torch
from test_train import SMALL, losses

import askd.train
from askd import models
from askd.checkpoint import load
from askd.config import Config
from askd.losses import build, registry
from askd.losses.registry import Method, Outputs, canonical, needs_of, register
from askd.nn import ArcFace
from askd.train import Phase, main, step_loss

ALL = ["base", "kd", "at", "at_cos", "fkd", "rkd", "horkd", "askd", "askd_sa", "askd_ca", "askd+kd"]
TERMS = {  # the loss terms each student logs next to ce
    "base": set(), "kd": {"kd"}, "at": {"at"}, "at_cos": {"at_cos"}, "fkd": {"fkd"},
    "rkd": {"rkd_distance", "rkd_angle"}, "horkd": {"horkd_l1", "horkd_distance", "horkd_angle", "horkd_centre"},
    "askd": {"askd"}, "askd_sa": {"askd_sa"}, "askd_ca": {"askd_ca"}, "askd+kd": {"askd", "kd"},
}


def test_specs_aliases_and_needs():
    assert set(registry.names()) == set(ALL[:-1])
    assert canonical("askd_kd") == "askd+kd" and canonical(" kd + askd ") == "kd+askd"
    assert canonical("base+askd") == "askd" and canonical("base") == "base"
    with pytest.raises(ValueError, match="unknown method 'magic' in 'at[+]magic'"):
        canonical("at+magic")
    with pytest.raises(ValueError, match="names a part twice"):
        canonical("kd+kd")
    assert needs_of("base") == frozenset()
    assert needs_of("at+kd") == {"teacher", "stages", "teacher_logits"}
    assert needs_of("askd") == {"teacher", "maps"}


def test_register_refuses_bad_methods():
    class Taken(Method):
        name = "askd"

    class Stray(Method):
        name = "stray"
        needs = frozenset({"stages"})

    class Unknown(Method):
        name = "unknown_needs"
        needs = frozenset({"teacher", "depth"})

    for cls, match in ((Taken, "taken"), (Stray, "add 'teacher'"), (Unknown, "known needs")):
        with pytest.raises(ValueError, match=match):
            register(cls)
    assert "stray" not in registry.REGISTRY


def test_composite_sums_parts_and_refuses_a_term_given_twice():
    cfg = Config(embedding_size=4)
    method = build("askd_kd", cfg, 3)
    assert method.name == "askd+kd" and method.needs == {"teacher", "maps", "teacher_logits"}
    assert list(method.state_dict()) == []

    class Echo(Method):
        name = "echo"

        def forward(self, out):
            return {"kd": out.student_emb.sum()}

    clash = registry.Composite({"kd": build("kd", cfg, 3), "echo": Echo(cfg, 3)})
    g = torch.Generator().manual_seed(0)
    emb, logits = torch.randn(2, 4, generator=g), torch.randn(2, 3, generator=g)
    out = Outputs(torch.tensor([0, 1]), emb, [], logits, teacher_logits=logits.flip(0))
    with pytest.raises(ValueError, match=r"echo gives the terms \['kd'\]"):
        clash(out)


def test_stage_outputs_only_when_asked():
    torch.manual_seed(0)
    model = models.create("ir_tiny_cbam", embedding_size=16).eval()
    x = torch.rand(2, 3, 112, 112) * 2 - 1
    emb, maps = model(x)
    emb2, maps2, feats = model(x, stages=True)
    torch.testing.assert_close(emb2, emb)
    assert len(maps2) == len(maps) == 4
    assert [tuple(f.shape) for f in feats] == [(2, 8, 56, 56), (2, 16, 28, 28), (2, 32, 14, 14), (2, 64, 7, 7)]
    # each is the output of the stage's last block: the input of the next stage's first block
    h = model.stem(x)
    for i, block in enumerate(model.blocks):
        h = block(h)[0]
        if i in model.stage_ends:
            torch.testing.assert_close(feats[model.stage_ends.index(i)], h)
    assert models.create("ir50_cbam", embedding_size=16).stage_ends == (2, 6, 20, 23)


class Recorder(torch.nn.Module):
    """A model wrapper that records whether it was asked for its stage outputs."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, []

    def forward(self, x, stages=False):
        self.calls.append(stages)
        return self.model(x, stages=stages) if stages else self.model(x)


class NoTeacher(torch.nn.Module):
    def forward(self, *args, **kwargs):
        raise AssertionError("a base student must not run the teacher")


@pytest.mark.parametrize("spec, stages, teacher_runs", [("base", False, False), ("askd", False, True),
                                                        ("at", True, True), ("at_cos+kd", True, True)])
def test_the_step_computes_what_the_method_needs(spec, stages, teacher_runs):
    cfg = Config(embedding_size=16)
    torch.manual_seed(0)
    student = Recorder(models.create("ir_tiny_cbam", embedding_size=16))
    teacher = Recorder(models.create("ir_tiny_cbam", embedding_size=16).eval()) if teacher_runs else NoTeacher()
    head = ArcFace(16, 5)
    phase = Phase("student", build(spec, cfg, 5), "ir_tiny_cbam", teacher, head)
    hr, labels = torch.rand(2, 3, 112, 112) * 2 - 1, torch.tensor([1, 3])
    terms = step_loss(cfg, phase, student, head, hr, labels)
    assert student.calls == [stages]
    if teacher_runs:
        assert teacher.calls == [stages]
    assert set(terms) == {"loss", "ce", "acc", *TERMS.get(spec, {"at_cos", "kd"})}
    parts = sum(v for k, v in terms.items() if k not in ("loss", "acc"))
    torch.testing.assert_close(terms["loss"], parts)
    terms["loss"].backward()
    if teacher_runs:
        assert all(p.grad is None for p in teacher.parameters())


def test_a_method_that_needs_a_teacher_gets_one():
    with pytest.raises(ValueError, match="needs .* of a teacher"):
        Phase("student", build("fkd", Config(), 5), "ir_tiny_cbam")
    with pytest.raises(ValueError, match="phase role"):
        Phase("pupil", build("base", Config(), 5), "ir_tiny_cbam")


def test_stage_is_the_deprecated_name_of_phase():
    with pytest.warns(DeprecationWarning, match="askd.train.Stage is deprecated; use askd.train.Phase"):
        from askd.train import Stage
    assert Stage is Phase and "Stage" not in askd.train.__all__
    assert Stage("teacher", build("base", Config(), 5), "ir_tiny_cbam").dirname == "teacher"
    with pytest.raises(AttributeError, match="no attribute 'Stages'"):
        askd.train.Stages  # noqa: B018


def test_every_method_against_one_teacher(tmp_path):
    out = tmp_path / "all"
    argv = [*SMALL, "--method", ",".join(ALL), "--out", str(out), "--set", "max_steps=2"]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    rows = list(results["verification"]["held-out"])
    assert rows == ["teacher (HR)", "teacher (LR)", *(f"student {m} (LR)" for m in ALL)]
    assert list(results["attention_correlation"]) == ALL
    for method in ALL:
        line = json.loads((out / f"student_{method}" / "metrics.jsonl").read_text().splitlines()[-1])
        assert set(line) - {"phase", "step", "epoch", "lr", "img_per_s", "loss", "ce", "acc"} == TERMS[method]
        terms = [line[k] for k in ("ce", *TERMS[method])]
        assert line["loss"] == pytest.approx(sum(terms), rel=1e-5) and all(v >= 0 for v in terms)
        ckpt = load(out / f"student_{method}" / "checkpoint.pt")
        assert (ckpt["role"], ckpt["method"]) == ("student", method)
    table = (out / "results.md").read_text()
    assert all(f"| student {m} (LR) |" in table for m in ALL)


def test_weights_come_from_the_config(tmp_path):
    """Twice the weight, twice the logged term, on the same teacher, batch and student initialisation."""
    teacher = tmp_path / "t"
    assert main([*SMALL, "--phases", "teacher", "--out", str(teacher), "--set", "max_steps=1"]) == 0
    ckpt = str(teacher / "teacher" / "checkpoint.pt")
    common = [*SMALL, "--phases", "student", "--teacher", ckpt, "--method", "fkd,at", "--set", "max_steps=1"]
    assert main([*common, "--out", str(tmp_path / "a")]) == 0
    assert main([*common, "--out", str(tmp_path / "b"), "--set", "fkd_weight=0.2", "--set", "at_beta=2000"]) == 0
    for method in ("fkd", "at"):
        a, b = (json.loads((tmp_path / r / f"student_{method}" / "metrics.jsonl").read_text()) for r in "ab")
        assert b[method] == pytest.approx(2 * a[method], rel=1e-5) and b["ce"] == a["ce"]


def test_resumed_horkd_keeps_its_centres(tmp_path):
    teacher = tmp_path / "t"
    assert main([*SMALL, "--phases", "teacher", "--out", str(teacher), "--set", "max_steps=2"]) == 0
    ckpt = str(teacher / "teacher" / "checkpoint.pt")
    common = [*SMALL, "--phases", "student", "--method", "horkd", "--teacher", ckpt]
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    assert main([*common, "--out", str(straight), "--set", "max_steps=3"]) == 0
    assert main([*common, "--out", str(cut), "--set", "max_steps=2"]) == 0
    state = load(cut / "student_horkd" / "checkpoint.pt")["method_state"]
    assert set(state) == {"centres.sums", "centres.counts"} and state["centres.counts"].sum() == 2 * 8
    assert main(["--out", str(cut), "--resume", "--set", "max_steps=3"]) == 0
    assert losses(cut, "student_horkd")[3] == losses(straight, "student_horkd")[3]
    a, b = (load(r / "student_horkd" / "checkpoint.pt")["method_state"] for r in (straight, cut))
    assert torch.equal(a["centres.sums"], b["centres.sums"]) and a["centres.counts"].sum() == 3 * 8


def test_horkd_through_an_assistant(tmp_path):
    """--assistant: teacher (HR, ir18) -> assistant (HR, ir_tiny) -> student (LR, ir_tiny), each its own phase."""
    out = tmp_path / "a"
    argv = [*SMALL, "--arch", "ir18_cbam", "--assistant", "ir_tiny_cbam", "--method", "base,horkd",
            "--out", str(out), "--set", "max_steps=1"]
    assert main(argv) == 0
    phases = {p.parent.name: load(p) for p in out.glob("*/checkpoint.pt")}
    assert {k: (v["role"], v["arch"]) for k, v in phases.items()} == {
        "teacher": ("teacher", "ir18_cbam"), "assistant_horkd": ("assistant", "ir_tiny_cbam"),
        "student_horkd": ("student", "ir_tiny_cbam"), "student_base": ("student", "ir_tiny_cbam"),
    }
    results = json.loads((out / "results.json").read_text())
    assert "assistant horkd (HR)" in results["verification"]["held-out"]
    assert results["attention_correlation"] == {}  # other blocks than the teacher's: nothing to correlate
    # the assistant phase resumes like any other: finished phases are kept
    assert main(["--out", str(out), "--resume"]) == 0
