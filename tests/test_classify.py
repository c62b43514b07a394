"""``askd.train --task classify``: LR image classification with ResNet-CBAM on the same pipeline as the faces.

Two steps of every method of the paper's Table 4 on the shapes set, a resume, CIFAR from generated pickles,
the task's config rules, the LR synthesis, and the experiment's table for a classification grid.
"""

from __future__ import annotations

import json

import pytest
import torch
from test_data_classify import make_cifar10, make_tree
from test_train import losses

from askd.checkpoint import load, load_model
from askd.config import Config, ConfigError, apply
from askd.data.cifar import read_cifar
from askd.data.classfolders import ClassFolders
from askd.data.degrade import bicubic
from askd.eval.cli import main as eval_main
from askd.experiment import main as experiment_main
from askd.export import main as export_main
from askd.train import main

# the shapes set at its smallest: 4 classes x 8 training images, 4 validation images per class, batches of 8
TINY = [
    "--task", "classify", "--batch-size", "8", "--set", "shapes_classes=4", "--set", "shapes_samples=8",
    "--set", "shapes_val_samples=4", "--set", "log_every=1",
]
TABLE4 = "base,kd,at+kd,rkd+kd,askd+kd"


def test_two_steps_of_every_method_of_table4(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*TINY, "--method", TABLE4, "--set", "max_steps=2", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["task"] == "classify" and results["input_size"] == 32 and results["low_res_size"] == 8
    assert list(results["accuracy"]) == ["val top-1", "val top-5"]
    students = [f"student {m} (LR)" for m in TABLE4.split(",")]
    assert list(results["accuracy"]["val top-1"]) == ["teacher (HR)", "teacher (LR)", *students]
    for column in results["accuracy"].values():
        assert all(0.0 <= r["accuracy"] <= 1.0 for r in column.values())
    assert all(r["accuracy"] == 1.0 for r in results["accuracy"]["val top-5"].values())  # 4 classes: top-5 is all
    assert set(results["attention_correlation"]) == set(TABLE4.split(","))
    for method in TABLE4.split(","):
        rows = [json.loads(line) for line in (out / f"student_{method}" / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [1, 2] and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
        terms = set(rows[0]) - {"phase", "step", "epoch", "lr", "img_per_s", "loss", "ce", "acc"}
        expected = {"base": set(), "kd": {"kd"}, "at+kd": {"at", "kd"}, "rkd+kd": {"rkd_distance", "rkd_angle", "kd"},
                    "askd+kd": {"askd", "kd"}}[method]
        assert terms == expected, method
    assert "| student askd+kd (LR) |" in (out / "results.md").read_text()
    # a checkpoint of the task loads as the classifier it is, with its class count and stem
    model, ckpt = load_model(out / "student_askd+kd" / "checkpoint.pt")
    assert ckpt["task"] == "classify" and ckpt["model_kwargs"] == {"num_classes": 4, "stem": "cifar"}
    logits, maps = model(torch.zeros(2, 3, 32, 32))
    assert logits.shape == (2, 4) and len(maps) == 4
    # the face tools refuse it, saying why
    for tool in (export_main, eval_main):
        args = [str(out / "teacher" / "checkpoint.pt"), str(tmp_path / "t.onnx")] if tool is export_main else \
            ["attention", "--teacher", str(out / "teacher" / "checkpoint.pt"), "--student", str(out / "student_base" /
             "checkpoint.pt"), "--folder", str(tmp_path), "--out", str(tmp_path / "a")]
        assert tool(args) == 2
        assert "holds a model of task classify" in capsys.readouterr().err


def test_an_imagenet_style_tree(tmp_path):
    tree, out = make_tree(tmp_path / "tree"), tmp_path / "run"
    argv = ["--task", "classify", "--data", str(tree), "--set", "input_size=48", "--batch-size", "4",
            "--method", "askd+kd", "--set", "max_steps=1", "--out", str(out)]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["input_size"] == 48 and results["low_res_size"] == 12
    assert results["images"]["val"] == len(ClassFolders(tree, size=48).val)


def test_a_classification_run_resumes_to_the_same_loss(tmp_path):
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    argv = [*TINY, "--phases", "teacher", "--set", "epochs=2"]
    assert main([*argv, "--out", str(straight), "--set", "max_steps=6"]) == 0
    assert main([*argv, "--out", str(cut), "--set", "max_steps=5"]) == 0  # 4 steps an epoch: into epoch 2
    assert main(["--out", str(cut), "--resume", "--set", "max_steps=6"]) == 0
    assert losses(cut, "teacher")[6] == losses(straight, "teacher")[6]  # same images, views, flips and weights


def test_cifar_from_its_python_pickles(tmp_path):
    root = tmp_path / "data"
    make_cifar10(root, n=8)
    out = tmp_path / "run"
    argv = ["--task", "classify", "--data", str(root), "--batch-size", "8", "--method", "base,askd+kd",
            "--set", "max_steps=1", "--out", str(out)]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["images"] == {"val": len(read_cifar(root).test)} and results["low_res_size"] == 8


def test_the_task_sets_its_defaults_and_refuses_what_does_not_fit():
    cfg = apply(Config(), {"task": "classify"}, "test")
    assert (cfg.arch, cfg.scale, cfg.method) == ("resnet_tiny_cbam", 4, "base,askd+kd,at+kd,rkd+kd")
    assert (cfg.input_side(), cfg.low_res_side()) == (32, 8)
    # values given with the task are kept, and the face defaults come back with the face task
    cfg = apply(Config(), {"task": "classify", "arch": "resnet18_cbam", "scale": 8}, "test")
    assert (cfg.arch, cfg.scale) == ("resnet18_cbam", 8)
    assert apply(cfg, {"task": "face", "arch": "ir18_cbam"}, "test").method == "base,askd"
    with pytest.raises(ConfigError, match="ir18_cbam is a model for task face"):
        apply(Config(), {"task": "classify", "arch": "ir18_cbam"}, "test")
    with pytest.raises(ConfigError, match="resnet18_cbam is a model for task classify"):
        apply(Config(), {"arch": "resnet18_cbam"}, "test")
    with pytest.raises(ConfigError, match="horkd is for task face only"):
        apply(Config(), {"task": "classify", "method": "base,horkd"}, "test")
    with pytest.raises(ConfigError, match="expected 3..32 px"):
        apply(Config(), {"task": "classify", "low_res_size": 40}, "test")
    assert apply(Config(), {"task": "classify", "input_size": 64}, "test").low_res_side() == 16


def test_classify_data_that_is_none_of_the_sources_is_refused(tmp_path, capsys):
    (tmp_path / "faces" / "someone").mkdir(parents=True)
    assert main(["--task", "classify", "--data", str(tmp_path / "faces"), "--out", str(tmp_path / "o")]) == 2
    assert "none of 'synthetic'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_bicubic_low_res_keeps_shape_range_and_flat_images():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    y = bicubic(x, 8)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert (y >= x.amin(dim=(1, 2, 3), keepdim=True)).all() and (y <= x.amax(dim=(1, 2, 3), keepdim=True)).all()
    assert (y - x).abs().mean() > 0.1  # the fine detail is gone
    flat = torch.full((1, 3, 32, 32), 0.25)
    assert torch.allclose(bicubic(flat, 8), flat)
    with pytest.raises(ValueError, match="LR size must be in"):
        bicubic(x, 40)


def test_an_experiment_grid_of_classification_runs(tmp_path):
    out = tmp_path / "grid"
    argv = [*TINY, "--method", "base,askd+kd", "--set", "max_steps=1", "--out", str(out)]
    assert experiment_main(argv) == 0
    table = json.loads((out / "table.json").read_text())
    assert table["sets"] == ["val top-1", "val top-5"] and table["images"] == {"val": 16}
    assert [r["model"] for r in table["accuracy"]][:1] == ["teacher (HR)"]
    text = (out / "table.md").read_text()
    assert "validation images: val 16" in text and "| 4x (8 px) | student askd+kd (LR) |" in text
    assert load(out / "scale4_seed0" / "student_askd+kd" / "checkpoint.pt")["task"] == "classify"
