"""The compiled extension ``askd._C``: it builds with OpenMP, and ``askd`` still imports without it."""

import importlib
import re
import sys

import pytest
import torch

import askd
from askd import _ext


def test_build_info_reports_openmp():
    if _ext.load() is None:
        pytest.skip(f"askd._C is not importable: {_ext.error()}")
    info = torch.ops.askd.build_info()
    assert info and "OpenMP" in info
    assert _ext.build_info() == info
    if sys.platform.startswith("linux"):
        # setup.py compiles with -fopenmp on Linux
        assert "OpenMP off" not in info


def test_import_survives_missing_extension(monkeypatch):
    try:
        with monkeypatch.context() as patch:
            # a None entry makes `import askd._C` raise ImportError, as if it was never built
            patch.setitem(sys.modules, "askd._C", None)
            importlib.reload(askd)
            ext = importlib.reload(_ext)
            assert ext.load() is None
            assert "askd._C" in ext.error()
            with pytest.raises(RuntimeError, match=re.escape(ext.HINT)):
                ext.build_info()
    finally:
        # drop the forced failure so later tests see the real extension again
        importlib.reload(_ext)
