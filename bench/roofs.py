"""The machine's roofs, measured in the benchmark session, and the work counts that put a timing against them.

Roofs (``measure(device)``), each the best rate over a few sizes and repeats:
- compute, per dtype (fp32, and bf16 where the device has it natively): the best of a large ``torch.mm``
  (2 n^3 FLOP for n x n by n x n) and a large channels_last 3x3 convolution, stride 1, same padding
  (2 B C_out H W C_in 9 FLOP; oneDNN on a CPU). Both count: on AMD CPUs the BLAS behind ``torch.mm`` is slower
  than oneDNN's convolutions, on others the other way round.
- copy bandwidth: ``dst.copy_(src)`` of a large fp32 tensor, counting the bytes read and written (2 x its size).
A figure is then stated as achieved GFLOP/s and its share of the compute roof (the training step, with FLOPs
counted from the model by ``step_flops``), or as achieved GB/s and its share of the copy bandwidth (the fused
ops, with the bytes they must move from ``cbam_bytes`` / ``distill_bytes``).

FLOPs: ``torch.utils.flop_counter`` counts the multiply-adds of convolutions and matrix products (2 FLOP each),
forward and backward as autograd runs them, on the meta device (no compute, no memory). Element-wise work
(BatchNorm, PReLU, CBAM's pooling, the loss) is not counted: it is bandwidth, not compute. IR-50 at 112 px
counts 6.31 GMAC per image forward, as the literature's figure.
"""

from __future__ import annotations

import time

import torch
from torch.utils.flop_counter import FlopCounterMode

# (n,) of the matrix products and (B, C, H) of the 3x3 convolutions (C in = C out) that the compute roof tries
MM_SIZES = (1024, 2048, 4096)
CONV_SIZES = ((32, 256, 28), (32, 128, 56), (32, 512, 14))
COPY_NUMEL = 64 * 2**20  # 256 MB of fp32, far beyond any cache
SMALL = {"mm": (256,), "conv": ((2, 32, 14),), "copy": 2**20}  # a smoke run (--benchmark-disable)


def mm_flops(n: int) -> int:
    """FLOPs of (n,n) @ (n,n): n^2 outputs of n multiply-adds."""
    return 2 * n**3


def conv3x3_flops(batch: int, channels: int, side: int) -> int:
    """FLOPs of a 3x3 convolution, stride 1, same padding, C -> C channels on (B,C,H,H): B C H^2 outputs of
    9 C multiply-adds (the border's zero taps counted, as every FLOP count does)."""
    return 2 * batch * channels * side * side * channels * 9


def copy_bytes(numel: int, itemsize: int) -> int:
    """Bytes a copy moves: every element read once and written once."""
    return 2 * numel * itemsize


def native_bf16(device: str) -> bool:
    """Whether the device runs bf16 natively: CUDA, or a CPU whose oneDNN has bf16 kernels (AVX512-BF16, AMX)."""
    return device == "cuda" or bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def best_seconds(fn, repeats: int) -> float:
    """The shortest of ``repeats`` timed calls of ``fn`` after one untimed warm-up call (synchronised)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    fn()
    sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def compute_roof(device: str, dtype: torch.dtype, small: bool = False, repeats: int = 3) -> dict:
    """{"gflops": the best rate, "by": which kernel and size, "tried": {name: GFLOP/s}}."""
    tried = {}
    for n in SMALL["mm"] if small else MM_SIZES:
        a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
        tried[f"mm n={n}"] = mm_flops(n) / best_seconds(lambda a=a, b=b: torch.mm(a, b), repeats) / 1e9
    with torch.no_grad():
        for batch, c, h in SMALL["conv"] if small else CONV_SIZES:
            x = torch.randn(batch, c, h, h, device=device).to(dtype).contiguous(memory_format=torch.channels_last)
            conv = torch.nn.Conv2d(c, c, 3, padding=1, bias=False).to(device, dtype, memory_format=torch.channels_last)
            seconds = best_seconds(lambda conv=conv, x=x: conv(x), repeats)
            tried[f"conv3x3 B={batch} C={c} H={h} channels_last"] = conv3x3_flops(batch, c, h) / seconds / 1e9
    by = max(tried, key=tried.get)
    return {"gflops": tried[by], "by": by, "tried": tried}


def copy_bandwidth(device: str, small: bool = False, repeats: int = 5) -> dict:
    """{"gbs": the best copy rate in GB/s (1e9 bytes), bytes read + written, "numel": the fp32 elements}."""
    numel = SMALL["copy"] if small else COPY_NUMEL
    src, dst = torch.randn(numel, device=device), torch.empty(numel, device=device)
    return {"gbs": copy_bytes(numel, 4) / best_seconds(lambda: dst.copy_(src), repeats) / 1e9, "numel": numel}


def measure(device: str, small: bool = False) -> dict:
    """The roofs of ``device`` at the current thread count: {"float32": compute_roof, "bfloat16": compute_roof
    or {"not_measured": why}, "copy": copy_bandwidth, "threads": n}. ``small``: tiny sizes, for a smoke run."""
    roofs = {"float32": compute_roof(device, torch.float32, small), "copy": copy_bandwidth(device, small)}
    if native_bf16(device):
        roofs["bfloat16"] = compute_roof(device, torch.bfloat16, small)
    else:
        roofs["bfloat16"] = {"not_measured": "this CPU has no native bf16 (no AVX512-BF16 or AMX in oneDNN)"}
    roofs["threads"] = torch.get_num_threads()
    return roofs


def count_flops(fn) -> int:
    """FLOPs of the matrix products and convolutions ``fn()`` runs (forward and any backward inside it)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def forward_flops(arch: str, batch: int = 1, side: int = 112, variant: str = "official") -> int:
    """FLOPs of one forward of ``arch`` at ``batch`` images of ``side`` px, counted on the meta device."""
    from askd import models

    with torch.device("meta"):
        model = models.create(arch, variant=variant, backend="torch").eval()
        x = torch.empty(batch, 3, side, side)
    with torch.no_grad():
        return count_flops(lambda: model(x))


def step_flops(arch: str, batch: int, classes: int, side: int = 112, variant: str = "official",
               embedding_size: int = 512) -> dict:
    """FLOPs of one distillation step on the meta device: the frozen teacher's forward, and the student's
    forward and backward with a Linear head of ``classes`` (ArcFace's cosine logits are that product; the
    margin is element-wise). {"teacher": F, "student": F, "total": F}."""
    from askd import models

    with torch.device("meta"):
        student = models.create(arch, variant=variant, embedding_size=embedding_size, backend="torch").train()
        head = torch.nn.Linear(embedding_size, classes, bias=False)
        x = torch.empty(batch, 3, side, side)

    def student_step():
        emb, _ = student(x)
        head(emb).sum().backward()

    teacher = forward_flops(arch, batch, side, variant)
    total_student = count_flops(student_step)
    return {"teacher": teacher, "student": total_student, "total": teacher + total_student}



def cbam_bytes(batch: int, channels: int, side: int, itemsize: int, backward: bool) -> int:
    """The compulsory traffic of a CBAM on (B,C,H,H): forward reads x and writes y (each once) and writes the two
    maps (B,C) and (B,1,H,H); backward reads dy, x and the maps' gradients and writes dx. A kernel that reads x
    twice (the channel statistics must be complete before y) moves more than this, so it cannot reach 100%."""
    n, maps = batch * channels * side * side, batch * (channels + side * side)
    forward = 2 * n + maps
    return (forward + 3 * n + maps) * itemsize if backward else forward * itemsize


def distill_bytes(maps: list[tuple[torch.Tensor, torch.Tensor]]) -> int:
    """The compulsory traffic of the A-SKD loss forward + backward over ``maps`` (the student's, the teacher's
    alike): read every teacher and student map once, write the gradient of every student map."""
    return 3 * sum(m.numel() * m.element_size() for pair in maps for m in pair)
