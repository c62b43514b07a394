"""The methods behind ``--method``: one registry, one interface, composition with ``+``.

A method is a small ``nn.Module`` (so that state such as HORKD's class centres is in its ``state_dict``, goes
into the checkpoint and moves with ``.to(device)``). It is built from the run's config as
``Method(cfg, num_classes)`` (its weights are config keys), declares what it needs, and maps one step's
:class:`Outputs` to named loss terms, each already weighted. The training step adds the terms to ArcFace's
cross-entropy and has no method names in it.

``needs`` is a subset of :data:`NEEDS`; the student's embedding, maps and margin logits and the labels are
always there:
    "teacher"         the frozen teacher's embedding and maps (a method without it runs no teacher forward)
    "maps"            compares the teacher's CBAM maps with the student's block by block: both models need
                      the same blocks (checked before a run with ``--assistant`` of another depth starts)
    "stages"          the four stage outputs of teacher and student (``model(x, stages=True)``)
    "teacher_logits"  the teacher's ArcFace margin logits on its embedding

A spec names one student: a registered name, an alias (:data:`ALIASES`), or names joined by ``+``, whose
terms are summed (``askd+kd``). The module of each method registers it with :func:`register`; importing
:mod:`askd.losses` imports them all, so :data:`REGISTRY` is complete whenever this module is usable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..nn.cbam import MapPair

NEEDS = frozenset({"teacher", "maps", "stages", "teacher_logits"})
# the Outputs fields a need promises, checked before a method runs (the student's embedding, maps and logits and the
# labels are always there; the teacher's embedding too after a teacher forward, and the losses that read it check it)
FIELDS = {
    "teacher": (),
    "maps": ("teacher_maps",),
    "stages": ("teacher_stages", "student_stages"),
    "teacher_logits": ("teacher_logits",),
}
ALIASES = {"askd_kd": "askd+kd"}


@dataclass
class Outputs:
    """What one training step hands the methods; B samples, E embedding size, N classes.

    A field a method did not ask for (see :data:`NEEDS`) is None."""

    labels: torch.Tensor  # int64 (B,)
    student_emb: torch.Tensor  # (B,E)
    student_maps: list[MapPair]  # one (channel (B,C), spatial (B,1,H,W)) per CBAM block
    student_logits: torch.Tensor  # (B,N) ArcFace margin logits, s-scaled
    teacher_emb: torch.Tensor | None = None  # (B,E), no gradient
    teacher_maps: list[MapPair] | None = None
    student_stages: list[torch.Tensor] | None = None  # 4 x (B,C_k,H_k,W_k)
    teacher_stages: list[torch.Tensor] | None = None
    teacher_logits: torch.Tensor | None = None  # (B,N)


class Method(nn.Module):
    """One distillation method: ``method(outputs) -> {term name: weighted scalar loss}``."""

    name: ClassVar[str]
    needs: ClassVar[frozenset[str]] = frozenset()
    paper: ClassVar[str] = ""  # where the method comes from, for the docs and ``--help``

    def __init__(self, cfg, num_classes: int):
        super().__init__()

    def __call__(self, out: Outputs) -> dict[str, torch.Tensor]:
        # a field the method needs but was not given is named here, not met as None deep inside a loss
        missing = [f for need in sorted(self.needs) for f in FIELDS[need] if getattr(out, f) is None]
        if missing:
            raise ValueError(f"method {self.name!r} needs {', '.join(missing)} in its Outputs (its needs: "
                             f"{sorted(self.needs)}), got None")
        return super().__call__(out)

    def forward(self, out: Outputs) -> dict[str, torch.Tensor]:
        raise NotImplementedError


class Weighted(Method):
    """A method of one term, named as the method: ``weight_factor * cfg.<weight_key> * self.loss(out)``."""

    weight_key: ClassVar[str]
    weight_factor: ClassVar[float] = 1.0

    def __init__(self, cfg, num_classes: int):
        super().__init__(cfg, num_classes)
        self.weight = self.weight_factor * getattr(cfg, self.weight_key)

    def loss(self, out: Outputs) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, out: Outputs) -> dict[str, torch.Tensor]:
        return {self.name: self.weight * self.loss(out)}


REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: add a method to :data:`REGISTRY` under its ``name``."""
    unknown = set(cls.needs) - NEEDS
    if unknown:
        raise ValueError(f"method {cls.name!r} needs {sorted(unknown)}; known needs: {sorted(NEEDS)}")
    if cls.needs and "teacher" not in cls.needs:
        raise ValueError(f"method {cls.name!r}: what it needs comes from a teacher; add 'teacher' to its needs")
    if cls.name in REGISTRY or cls.name in ALIASES or "+" in cls.name:
        raise ValueError(f"method name {cls.name!r} is taken or not a plain name")
    REGISTRY[cls.name] = cls
    return cls


@register
class Base(Method):
    """ArcFace alone: no distillation term, and no teacher forward."""

    name = "base"
    paper = "ArcFace (Deng et al. 2019) on the LR images, no teacher"

    def forward(self, out: Outputs) -> dict[str, torch.Tensor]:
        return {}


class Composite(Method):
    """The sum of several methods' terms (``askd+kd``); a term name given by two of them is an error."""

    def __init__(self, parts: dict[str, Method]):
        super().__init__(None, 0)
        self.parts = nn.ModuleDict(parts)
        self.name = "+".join(parts)
        self.needs = frozenset().union(*(m.needs for m in parts.values()))

    def forward(self, out: Outputs) -> dict[str, torch.Tensor]:
        terms: dict[str, torch.Tensor] = {}
        for name, method in self.parts.items():
            new = method(out)
            clash = terms.keys() & new.keys()
            if clash:
                raise ValueError(f"method {self.name!r}: {name} gives the terms {sorted(clash)} a part before it gave")
            terms.update(new)
        return terms


def names() -> list[str]:
    """The registered method names, in registration order (the order of ``askd.losses``' imports)."""
    return list(REGISTRY)


def canonical(spec: str) -> str:
    """The canonical form of a spec: aliases resolved, parts in the given order; ValueError if unknown.

    ``askd_kd`` -> ``askd+kd``; a part may not repeat; ``base`` joined to others adds nothing and is dropped.
    """
    parts = [p.strip() for p in ALIASES.get(spec.strip(), spec).split("+")]
    unknown = [p for p in parts if p not in REGISTRY]
    if unknown or not spec.strip():
        known = ", ".join([*REGISTRY, *ALIASES])
        where = f" in {spec!r}" if len(parts) > 1 else ""
        raise ValueError(f"unknown method {(unknown or [''])[0]!r}{where}; expected a name, or names joined by '+', "
                         f"of: {known}")
    if len(set(parts)) != len(parts):
        raise ValueError(f"method {spec!r} names a part twice")
    kept = [p for p in parts if p != "base"] or ["base"]
    return "+".join(kept)


def needs_of(spec: str) -> frozenset[str]:
    """What the method of a spec needs (see :data:`NEEDS`), without building it."""
    return frozenset().union(*(REGISTRY[p].needs for p in canonical(spec).split("+")))


def build(spec: str, cfg, num_classes: int) -> Method:
    """The method of a spec, built from ``cfg`` for ``num_classes`` identities."""
    parts = canonical(spec).split("+")
    if len(parts) == 1:
        return REGISTRY[parts[0]](cfg, num_classes)
    return Composite({p: REGISTRY[p](cfg, num_classes) for p in parts})
