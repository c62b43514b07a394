"""``python -m askd.export``: the ONNX model matches PyTorch for batches 1 and 3 (dynamic batch); bad input fails
clearly and leaves no file behind. An export takes 10-15 s on a 2-core CPU, so the file runs one, shared."""

import contextlib
import io
import os
import shutil
import stat
import sys

import pytest
import torch

from askd import export, models
from askd.checkpoint import save_atomic
from askd.config import Config
from askd.losses import build
from askd.train import Phase, Trainer, build_model

NUM_CLASSES = 10
SKIP = "optional ONNX export dependency missing; pip install onnx onnxscript onnxruntime"


@pytest.fixture(scope="module")
def ort():
    pytest.importorskip("onnx", reason=SKIP)
    pytest.importorskip("onnxscript", reason=SKIP)
    return pytest.importorskip("onnxruntime", reason=SKIP)


def write_checkpoint(path, seed=0):
    """An askd student checkpoint as askd.train writes it (Trainer.state): an ir_tiny_cbam, embedding 512, whose
    BN statistics have moved away from the identity, so that the export must carry them."""
    cfg = Config(arch="ir_tiny_cbam", embedding_size=512)
    torch.manual_seed(seed)
    model, head = build_model(cfg, cfg.arch, NUM_CLASSES, torch.device("cpu"))
    with torch.no_grad():
        model(torch.rand(4, 3, 112, 112) * 2 - 1)  # in train mode: moves the running statistics
    opt = torch.optim.SGD([*model.parameters(), *head.parameters()], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    phase = Phase("student", build("base", cfg, NUM_CLASSES), cfg.arch)
    save_atomic(Trainer(cfg, phase, model, head, opt, sched, scaler, NUM_CLASSES).state(epoch=1), path)
    return path


def reference_model(ckpt_path):
    """The checkpoint's model built afresh, in eval mode: x (B,3,112,112) -> (embedding (B,E), maps)."""
    ckpt = torch.load(ckpt_path, weights_only=False)
    model = models.create(ckpt["arch"], ckpt["variant"], ckpt["embedding_size"], backend="torch")
    model.load_state_dict(ckpt["model"])
    return model.eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("run") / "student_askd" / "checkpoint.pt")


@pytest.fixture(scope="module")
def exported(ort, checkpoint, tmp_path_factory):
    """One dynamic-batch export through the command line: (checkpoint, onnx path, stdout)."""
    out = tmp_path_factory.mktemp("export") / "models" / "student.onnx"  # a folder that does not exist yet
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert export.main([str(checkpoint), str(out)]) == 0
    return checkpoint, out, stdout.getvalue()


def test_dynamic_batch_matches_pytorch_for_batch_1_and_3(ort, exported):
    ckpt, out, stdout = exported
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (image,), (embedding,) = session.get_inputs(), session.get_outputs()
    assert (image.name, image.type, image.shape) == ("image", "tensor(float)", ["batch", 3, 112, 112])
    assert (embedding.name, embedding.type, embedding.shape) == ("embedding", "tensor(float)", ["batch", 512])
    model, gen = reference_model(ckpt), torch.Generator().manual_seed(1)
    for b in (1, 3):
        x = torch.rand(b, 3, 112, 112, generator=gen) * 2 - 1
        with torch.no_grad():
            ref = model(x)[0]
        got = torch.from_numpy(session.run(["embedding"], {"image": x.numpy()})[0])
        assert ref.shape == (b, 512)
        torch.testing.assert_close(got, ref, rtol=0, atol=export.ATOL)
    assert "image      float32 [batch, 3, 112, 112]" in stdout and "embedding  float32 [batch, 512]" in stdout
    assert "student base" in stdout and "max abs diff" in stdout and "batches 1, 3" in stdout
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~umask  # as any new file, not mkstemp's owner-only 0o600
    assert sorted(p.name for p in out.parent.iterdir()) == ["student.onnx"]  # no temp file, no external data


def test_static_batch_and_opset_reach_the_exporter(monkeypatch, tmp_path):
    # a second real export would double the time of this file (kept under 40 s on 2 cores): check instead what
    # the static and the dynamic export ask of torch.onnx
    calls = []
    monkeypatch.setattr(torch.onnx, "export", lambda model, args, f, **kw: calls.append((args[0].shape, kw)))
    model = export.EmbeddingOnly(models.create("ir_tiny_cbam", backend="torch")).eval()
    export.write_onnx(model, tmp_path / "m.onnx", 19, 5)
    export.write_onnx(model, tmp_path / "m.onnx", None, None)
    (static_shape, static), (dynamic_shape, dynamic) = calls
    assert static_shape == (5, 3, 112, 112) and static["dynamic_shapes"] is None and static["opset_version"] == 19
    assert dynamic_shape[0] == export.EXAMPLE_BATCH and list(dynamic["dynamic_shapes"]["image"]) == [0]
    assert static["dynamo"] and not static["external_data"]
    assert static["input_names"] == ["image"] and static["output_names"] == ["embedding"]


def test_failed_check_writes_nothing(ort, exported, tmp_path, monkeypatch):
    # stand-in for a broken exporter: the "export" of another checkpoint is the first one's graph
    other = write_checkpoint(tmp_path / "other.pt", seed=1)
    monkeypatch.setattr(export, "write_onnx", lambda model, path, opset, batch: shutil.copyfile(exported[1], path))
    out = tmp_path / "out" / "other.onnx"
    with pytest.raises(export.ExportError, match="embeddings differ by up to .* not written"):
        export.export_onnx(other, out)
    assert list(out.parent.iterdir()) == []


def test_an_opset_the_exporter_could_not_write_is_refused(ort, exported, tmp_path, monkeypatch):
    # the exporter keeps its default opset when it cannot convert to the requested one
    wrote = export.describe(exported[1])["opset"]
    monkeypatch.setattr(export, "write_onnx", lambda model, path, opset, batch: shutil.copyfile(exported[1], path))
    with pytest.raises(export.ExportError, match=f"asked for opset {wrote + 1}, but .* could only write opset {wrote}"):
        export.export_onnx(exported[0], tmp_path / "m.onnx", opset=wrote + 1)
    assert list(tmp_path.iterdir()) == []


def run_error(argv, capsys) -> str:
    assert export.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("askd.export: error: ") and captured.err.count("\n") == 1
    assert "Traceback" not in captured.err
    return captured.err


def test_missing_checkpoint(tmp_path, capsys):
    missing = tmp_path / "nowhere" / "checkpoint.pt"
    err = run_error([str(missing), str(tmp_path / "m.onnx")], capsys)
    assert "checkpoint not found" in err and str(missing) in err
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize(
    "content, message",
    [
        (b"not a checkpoint", "cannot read checkpoint"),
        ({"state_dict": {}}, "is not an askd checkpoint"),
        ({"model": {}, "arch": "ir_tiny_cbam"}, "no variant/embedding_size"),
        ({"model": {}, "arch": "resnet9", "variant": "official", "embedding_size": 512}, "unknown model 'resnet9'"),
        ({"model": {"w": torch.zeros(1)}, "arch": "ir_tiny_cbam", "variant": "official", "embedding_size": 512},
         "does not load into ir_tiny_cbam/official"),
    ],
)
def test_a_file_that_is_no_askd_checkpoint_is_refused(tmp_path, capsys, content, message):
    path = tmp_path / "model.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    assert message in run_error([str(path), str(tmp_path / "m.onnx")], capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


def test_unwritable_output_and_bad_options(ort, checkpoint, tmp_path, capsys):
    ckpt, onnx_out = str(checkpoint), str(tmp_path / "m.onnx")
    (tmp_path / "file").write_text("")
    assert "cannot write" in run_error([ckpt, str(tmp_path / "file" / "m.onnx")], capsys)
    assert "it is a directory" in run_error([ckpt, str(tmp_path)], capsys)
    assert "refusing to overwrite the checkpoint" in run_error([ckpt, ckpt], capsys)
    assert "opset 17 is too old" in run_error([ckpt, onnx_out, "--opset", "17"], capsys)
    assert "static batch must be >= 1" in run_error([ckpt, onnx_out, "--static-batch", "0"], capsys)
    assert [p.name for p in tmp_path.iterdir()] == ["file"]
    assert [p.name for p in checkpoint.parent.iterdir()] == ["checkpoint.pt"]


def test_missing_optional_packages_are_named(checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` fail
    err = run_error([str(checkpoint), str(tmp_path / "m.onnx")], capsys)
    assert "pip install onnx onnxscript onnxruntime" in err and not (tmp_path / "m.onnx").exists()
