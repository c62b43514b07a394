"""Session-wide test settings.

Triton picks its interpreter when a kernel is decorated, i.e. when ``askd.kernels.*`` is first imported, which the
backend probe may do while collecting any test module. Without a GPU the Triton kernels can only run under
the interpreter, so it is switched on here, before any test module is imported.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def no_tf32(monkeypatch):
    """The references' convolutions and matmuls in full float32 on a GPU: TF32 would be the larger error."""
    if torch.cuda.is_available():
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
