"""Session-wide test settings.

Triton picks its interpreter when a kernel is decorated, i.e. when ``askd.kernels.*`` is first imported, which the
backend probe may do while collecting any test module. Without a GPU the Triton kernels can only run under
the interpreter, so it is switched on here, before any test module is imported.

The fuzz tests (tests/test_fuzz_*.py) run under the hypothesis profile ``ci``: the same examples on every run
(derandomized, no example database written), as many as each test's ``max_examples``, and no per-example deadline
(the first call of an op warms it up; the Triton interpreter is slow). ``pytest --hypothesis-profile explore``
draws new random examples on each run instead, to search further by hand.
"""

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

settings.register_profile(
    "ci", derandomize=True, database=None, deadline=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("explore", settings.get_profile("ci"), derandomize=False)
settings.load_profile("ci")


@pytest.fixture
def no_tf32(monkeypatch):
    """The references' convolutions and matmuls in full float32 on a GPU: TF32 would be the larger error."""
    if torch.cuda.is_available():
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
