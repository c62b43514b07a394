"""Backend resolution: precedence, validation, ``auto`` fallback and the ``python -m askd.info`` report."""

import subprocess
import sys
from pathlib import Path

import pytest

from askd import backend

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv(backend.ENV_VAR, raising=False)


@pytest.fixture
def all_available(monkeypatch):
    # pretend every backend runs, so the precedence tests see which name was picked
    monkeypatch.setattr(backend, "availability", lambda device: {"torch": None, "triton": None, "ext": None})


def test_default_is_torch(no_env):
    assert backend.default_backend() == "torch"
    assert backend.resolve(None, "cpu") == "torch"


@pytest.mark.usefixtures("all_available")
def test_argument_beats_env_beats_default(monkeypatch):
    monkeypatch.setenv(backend.ENV_VAR, "triton")
    assert backend.default_backend() == "triton"
    assert backend.resolve(None, "cpu") == "triton"
    assert backend.resolve("ext", "cpu") == "ext"
    assert backend.resolve("torch", "cpu") == "torch"


def test_unknown_names_list_valid_ones(monkeypatch):
    with pytest.raises(ValueError, match="torch, triton, ext, auto"):
        backend.resolve("cudnn", "cpu")
    monkeypatch.setenv(backend.ENV_VAR, "fast")
    with pytest.raises(ValueError, match="ASKD_BACKEND"):
        backend.default_backend()


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_auto_picks_first_available(device, no_env):
    reasons = backend.availability(device)
    expected = next(name for name in backend.AUTO_ORDER[device] if reasons[name] is None)
    assert backend.resolve("auto", device) == expected
    assert backend.describe_fallback(device).startswith(f"auto -> {expected} on {device}")


def test_auto_falls_back_to_torch(monkeypatch):
    monkeypatch.setattr(backend, "availability", lambda device: {"torch": None, "triton": "no", "ext": "no"})
    monkeypatch.setenv(backend.ENV_VAR, "auto")
    assert backend.resolve(None, "cuda") == "torch"
    assert backend.describe_fallback("cuda") == "auto -> torch on cuda; triton skipped: no; ext skipped: no"


def test_auto_on_cpu_is_ext_when_built_and_never_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(backend, "availability", lambda device: {"torch": None, "triton": None, "ext": None})
    assert backend.resolve("auto", "cpu") == "ext"
    monkeypatch.setattr(backend, "availability", lambda device: {"torch": None, "triton": None, "ext": "no"})
    assert backend.resolve("auto", "cpu") == "torch"


def test_ext_reason_names_missing_kernels(monkeypatch):
    monkeypatch.setattr(backend, "_ext_has", lambda op, device_type: op != "cbam")
    reason = backend.availability("cpu")["ext"]
    if backend._ext.load() is None:
        pytest.skip(f"askd._C not built: {reason}")
    assert reason == "askd._C has no cpu kernels for: cbam"


def test_triton_reasons(monkeypatch):
    # stand in for an importable triton, first without kernels, then with all of them
    monkeypatch.setattr(backend, "_triton_import_error", lambda: None)
    monkeypatch.setattr(backend, "_triton_kernel_problems", lambda: dict.fromkeys(backend.FUSED_OPS, "missing"))
    assert backend.availability("cuda")["triton"] == "no Triton kernels in this build yet"
    monkeypatch.setattr(backend, "_triton_kernel_problems", dict)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert backend.availability("cuda")["triton"] is None
    assert "TRITON_INTERPRET=1" in backend.availability("cpu")["triton"]
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backend.availability("cpu")["triton"] is None


@pytest.mark.parametrize("name", ["ext", "triton"])
def test_explicit_unavailable_backend_raises(name, no_env):
    reason = backend.availability("cpu")[name]
    if reason is None:
        pytest.skip(f"{name} is available here")
    with pytest.raises(backend.BackendUnavailable) as info:
        backend.resolve(name, "cpu")
    message = str(info.value)
    assert name in message and "cpu" in message and reason in message


def test_info_module_prints_backends():
    out = subprocess.run(
        [sys.executable, "-m", "askd.info"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    assert "askd " in out and "torch " in out and "extension askd._C:" in out
    assert "backends on cpu:" in out
    for name in ("torch", "triton", "ext"):
        assert f"  {name} " in out
    assert "auto -> " in out
