"""A RecordIO pack end to end: ``askd.data.pack --holdout`` -> ``askd.train --data PACK`` (evaluating on the
pack's .bin during training) -> ``python -m askd.eval`` verify / attention on the checkpoints it wrote."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from askd import models
from askd.data import pack
from askd.eval.cli import main as eval_main
from askd.eval.cli import parser, run_low_res_size
from askd.eval.figures import spatial_maps, stage_last_blocks
from askd.train import main as train_main

SMALL = ["--batch-size", "8", "--set", "log_every=1", "--set", "embedding_size=32", "--set", "max_steps=2"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(pack folder, run folder): 6 identities of 5 noise faces, 2 held out as heldout.bin; teacher + askd student."""
    root = tmp_path_factory.mktemp("faces")
    rng = np.random.default_rng(0)
    for person in range(6):
        (root / f"p{person}").mkdir()
        base = rng.integers(0, 256, (112, 112, 3))
        for i in range(5):
            face = np.clip(base + rng.integers(-20, 21, base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(face).save(root / f"p{person}" / f"{i}.png")
    dst, out = tmp_path_factory.mktemp("pack"), tmp_path_factory.mktemp("run")
    assert pack.main([str(root), str(dst), "--holdout", "0.3", "--pairs", "20"]) == 0
    assert train_main(["--data", str(dst), "--out", str(out), "--method", "askd", "--set", "eval_every=1", *SMALL]) == 0
    return dst, out


def test_training_on_a_pack_evaluates_on_its_bin(run, tmp_path):
    dst, out = run
    assert sorted(p.name for p in dst.iterdir()) == ["heldout.bin", "property", "train.idx", "train.rec"]
    assert (dst / "property").read_text().strip() == "4,112,112"  # 6 identities, 2 held out
    rows = [json.loads(line) for line in (out / "student_askd" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval" in r]
    assert [r["step"] for r in evals] == [1, 2] and set(evals[0]["eval"]) == {"heldout"}
    results = json.loads((out / "results.json").read_text())
    assert results["pairs"] == {"heldout": 20}
    # evaluating during training takes no random draw: the same steps without it give the same losses
    plain = tmp_path / "plain"
    assert train_main(["--data", str(dst), "--out", str(plain), "--phases", "teacher", *SMALL]) == 0

    def losses(run_dir):
        lines = (run_dir / "teacher" / "metrics.jsonl").read_text().splitlines()
        return [row["loss"] for row in map(json.loads, lines) if "loss" in row]

    assert losses(plain) == losses(out)
    assert set(results["verification"]["heldout"]) == {"teacher (HR)", "teacher (LR)", "student askd (LR)"}


def test_a_pack_needs_verification_sets(run, tmp_path, capsys):
    dst, _ = run
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("train.rec", "train.idx", "property"):
        (bare / name).write_bytes((dst / name).read_bytes())
    assert train_main(["--data", str(bare), "--out", str(tmp_path / "r"), *SMALL]) == 2
    assert "no verification .bin files" in capsys.readouterr().err
    missing = f"eval_bins={tmp_path / 'lfw.bin'}"
    assert train_main(["--data", str(bare), "--out", str(tmp_path / "r"), "--set", missing, *SMALL]) == 2
    assert "lfw.bin' not found" in capsys.readouterr().err


def test_eval_verify_and_attention(run, tmp_path, capsys):
    dst, out = run
    teacher, student = out / "teacher" / "checkpoint.pt", out / "student_askd" / "checkpoint.pt"
    report = tmp_path / "verify.json"
    argv = ["verify", str(teacher), str(student), "--bin", str(dst / "heldout.bin"), "--json", str(report)]
    assert eval_main(argv) == 0
    results = json.loads(report.read_text())["verification"]
    # each model on what it was trained on: the teacher on HR, the student on its LR size (112 / 8 = 14 px)
    assert list(results) == ["teacher (teacher, HR)", "student_askd (student askd, LR 14 px)"]
    train_acc = json.loads((out / "results.json").read_text())["verification"]["heldout"]
    assert results["teacher (teacher, HR)"]["heldout"] == train_acc["teacher (HR)"]
    assert results["student_askd (student askd, LR 14 px)"]["heldout"] == train_acc["student askd (LR)"]

    att = tmp_path / "att"
    argv = ["attention", "--teacher", str(teacher), "--student", f"askd={student}", "--bin", str(dst / "heldout.bin"),
            "--figure-images", "2", "--out", str(att)]
    assert eval_main(argv) == 0
    assert "| askd |" in (att / "attention.md").read_text()
    with Image.open(att / "attention.png") as png:
        assert png.size[0] > 300 and png.size[1] > 300
    assert "mean S" in capsys.readouterr().out


def test_a_checkpoints_low_res_size_and_the_flag_spellings():
    """A checkpoint's config names the LR side low_res_size, lr_size before the rename; --lr-size is --low-res-size."""
    assert run_low_res_size({"low_res_size": 20, "scale": 8}) == 20
    assert run_low_res_size({"lr_size": 20, "scale": 8}) == 20  # a checkpoint of an older version
    assert run_low_res_size({"low_res_size": 0, "scale": 4}) == 28 and run_low_res_size({}) == 14
    for flag in ("--low-res-size", "--lr-size"):
        assert parser().parse_args(["verify", "m.pt", "--bin", "x.bin", flag, "20"]).low_res_size == 20


def test_eval_errors_are_one_line(tmp_path, capsys):
    assert eval_main(["verify", str(tmp_path / "none.pt"), "--bin", str(tmp_path / "none.bin")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("askd.eval: error: ") and "none.bin" in err and err.count("\n") == 1
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    (tmp_path / "junk.bin").write_bytes(b"not a pickle")
    assert eval_main(["verify", str(tmp_path / "junk.pt"), "--bin", str(tmp_path / "junk.bin")]) == 2
    assert "junk.bin" in capsys.readouterr().err


def test_spatial_maps_of_the_last_block_per_stage():
    torch.manual_seed(0)
    model = models.create("ir_tiny_cbam", embedding_size=32).eval()
    x = torch.rand(2, 3, 112, 112) * 2 - 1
    with torch.no_grad():
        maps = model(x)[1]
        blocks = stage_last_blocks(maps)
        shown = spatial_maps(model, x, blocks)
    assert blocks == [0, 1, 2, 3]  # ir_tiny_cbam: one block per stage
    assert shown.shape == (2, 4, 112, 112)
    assert torch.allclose(shown.amin((2, 3)), torch.zeros(2, 4))
    assert torch.allclose(shown.amax((2, 3)), torch.ones(2, 4))
    ir50 = [(None, torch.zeros(1, 1, s, s)) for s in [56] * 3 + [28] * 4 + [14] * 14 + [7] * 3]
    assert stage_last_blocks(ir50) == [2, 6, 20, 23]
    with pytest.raises(ValueError, match="out of range"):
        spatial_maps(model, x, [4])
