"""``python -m askd.info``: versions, devices, the compiled extension and which fused-op backends can run."""

from __future__ import annotations

import torch

from . import __version__, _ext, backend


def _devices() -> list[str]:
    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


def report() -> list[str]:
    """The lines that ``python -m askd.info`` prints."""
    lines = [f"askd {__version__}", f"torch {torch.__version__} (CUDA build: {torch.version.cuda or 'none'})"]
    if torch.cuda.is_available():
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        lines.append(f"CUDA available: yes ({names})")
    else:
        lines.append("CUDA available: no")
    if _ext.load() is None:
        lines.append(f"extension askd._C: not available ({_ext.error()}); {_ext.HINT}")
    else:
        lines.append(f"extension askd._C: {_ext.build_info()}")
    try:
        lines.append(f"default backend: {backend.default_backend()} (${backend.ENV_VAR} or torch)")
    except ValueError as exc:
        lines.append(f"default backend: invalid ({exc})")
    for device in _devices():
        lines.append(f"backends on {device}:")
        for name, reason in backend.availability(device).items():
            lines.append(f"  {name:<7} {'available' if reason is None else 'unavailable: ' + reason}")
        lines.append(f"  {backend.describe_fallback(device)}")
    return lines


def main() -> None:
    print("\n".join(report()))


if __name__ == "__main__":
    main()
