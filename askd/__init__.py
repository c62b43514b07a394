"""askd: Attention Similarity Knowledge Distillation (A-SKD) for low-resolution face recognition.

Subpackages: ``askd.models`` (backbones), ``askd.nn`` (CBAM, ArcFace), ``askd.losses``, ``askd.data``,
``askd.eval``; ``python -m askd.train`` runs teacher -> student -> evaluation.
"""

__version__ = "0.1.0"
