"""The import graph is layered: data -> ops/kernels -> nn -> models -> losses -> eval -> train.

Each package is imported alone in a fresh interpreter, and the test checks which askd packages that loaded:
never one of a higher layer, and never a sibling the layering keeps apart (the references in ``askd.ops``
load the Triton kernels only by name, so the kernels must not import ``askd.ops`` either). The leaf modules
(``askd.numerics``, ``askd.archs``, ``askd.atomic``, ``askd.config``, ``askd.distributed``, ``askd.hostmem``) load
no layer at all.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

LAYERS = [
    ("askd.data",),
    ("askd.ops", "askd.kernels"),
    ("askd.nn",),
    ("askd.models",),
    ("askd.losses",),
    ("askd.eval",),
    ("askd.train",),
]
LEAVES = ("askd.numerics", "askd.archs", "askd.atomic", "askd.config", "askd.distributed", "askd.hostmem")
# pairs in one layer that must not import each other, and what a layer must not load besides higher layers
APART = {"askd.ops": {"askd.kernels"}, "askd.kernels": {"askd.ops"}}
ALSO_FORBIDDEN = {"askd.data": {"askd._C", "askd._ext", "askd.backend"}}
ALL = [name for layer in LAYERS for name in layer]


def forbidden(package: str) -> set[str]:
    """The askd packages that importing ``package`` must not load."""
    if package in LEAVES:
        return set(ALL)
    layer = next(i for i, names in enumerate(LAYERS) if package in names)
    higher = {name for names in LAYERS[layer + 1 :] for name in names}
    return higher | APART.get(package, set()) | ALSO_FORBIDDEN.get(package, set())


def loaded_by(modules: list[str]) -> dict[str, set[str]]:
    """module -> the askd packages (``askd.x``, no deeper) in sys.modules after importing it in a new interpreter;
    the interpreters run side by side."""
    code = (
        "import importlib, json, sys; importlib.import_module(sys.argv[1]); "
        "print(json.dumps(sorted({'.'.join(m.split('.')[:2]) for m in sys.modules if m.startswith('askd.')})))"
    )
    procs = {m: subprocess.Popen([sys.executable, "-c", code, m], stdout=subprocess.PIPE, text=True) for m in modules}
    out = {}
    for m, proc in procs.items():
        stdout, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"importing {m} alone failed"
        out[m] = set(json.loads(stdout))
    return out


def test_each_package_loads_only_lower_layers():
    modules = [*LEAVES, *ALL]
    if importlib.util.find_spec("triton") is None:
        modules.remove("askd.kernels")  # its modules need triton; the package itself is empty
    else:
        modules += ["askd.kernels.cbam", "askd.kernels.cosine_distill"]
    loaded = loaded_by(modules)
    problems = []
    for m, packages in loaded.items():
        package = ".".join(m.split(".")[:2])
        bad = sorted(packages & forbidden(package) - {package})
        if bad:
            problems.append(f"import {m} loads {', '.join(bad)}")
    assert not problems, "; ".join(problems)


def test_the_rule_itself():
    """What a few layers may not load, so that a slip in LAYERS cannot make the test above vacuous."""
    assert forbidden("askd.data") >= {"askd.ops", "askd.nn", "askd.models", "askd.eval", "askd._C"}
    assert forbidden("askd.ops") >= {"askd.kernels", "askd.nn", "askd.losses"}
    assert "askd.ops" in forbidden("askd.kernels")
    assert forbidden("askd.eval") == {"askd.train"}
    assert forbidden("askd.train") == set()
    assert forbidden("askd.numerics") == set(ALL)
