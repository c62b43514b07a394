"""Session-wide test settings.

Triton picks its interpreter when a kernel is decorated, i.e. when ``askd.kernels.*`` is first imported, which the
backend probe may do while collecting any test module. Without a GPU the Triton kernels can only run under
the interpreter, so it is switched on here, before any test module is imported.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
