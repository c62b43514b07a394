"""SyncBatchNorm for every device: batch statistics over the global batch of all processes.

PyTorch's ``nn.SyncBatchNorm`` runs on GPUs only (torch 2.13 refuses CPU tensors, and ``batch_norm_stats``
has no CPU kernel), so CPU processes (gloo) use :class:`SyncBatchNorm` here; :func:`convert_sync_batchnorm`
picks PyTorch's on CUDA. Same state-dict keys as ``nn.BatchNorm*d``: checkpoints do not depend on it.

Per channel c over the N = sum_r n_r values of all processes r (x (B,C,...) each):
    forward   mean_c, var_c (biased) of the global batch; y = (x - mean_c) / sqrt(var_c + eps) * w_c + b_c;
              running_var takes the unbiased var_c * N / (N - 1), as BatchNorm
    backward  xhat = (x - mean) * invstd;  dx = w * invstd * (dy - sum(dy) / N - xhat * sum(dy * xhat) / N),
              the sums all-reduced over the processes; dw = sum(dy * xhat), db = sum(dy) over the local rows
              (DistributedDataParallel averages them with every other gradient)
The statistics are combined from each process's own mean and centred sum of squares (Chan et al.'s pairwise
update) in float64: one all-gather, and no E[x^2] - E[x]^2 cancellation. Outside training, or in one process,
it is plain batch norm.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..distributed import active


def _channel_dims(x: torch.Tensor) -> list[int]:
    return [0, *range(2, x.dim())]


def _view(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-channel (C,) -> broadcastable against x (B,C,...)."""
    return v.view(1, -1, *([1] * (x.dim() - 2)))


def global_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(mean (C,), biased var (C,), N) over dims 0, 2, ... of the processes' x, in float64."""
    dims = _channel_dims(x)
    n = x.numel() // x.shape[1]
    var, mean = torch.var_mean(x.float(), dim=dims, correction=0)
    local = torch.cat([mean.double(), var.double() * n, torch.tensor([float(n)], dtype=torch.float64,
                                                                        device=x.device)])
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, local)
    table = torch.stack(parts)  # (W, 2C+1): means, centred sums of squares, counts
    c = x.shape[1]
    means, m2, counts = table[:, :c], table[:, c:2 * c], table[:, 2 * c]
    total = counts.sum()
    mean = (counts[:, None] * means).sum(0) / total
    m2_all = (m2 + counts[:, None] * (means - mean) ** 2).sum(0)
    return mean, m2_all / total, int(total.item())


class _SyncBatchNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps: float, momentum: float):
        mean, var, total = global_stats(x)
        if total < 2:
            raise ValueError(f"SyncBatchNorm: expected more than 1 value per channel in training, got {total}")
        if running_mean is not None:
            running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
            running_var.mul_(1 - momentum).add_((var * total / (total - 1)).to(running_var.dtype), alpha=momentum)
        mean32, invstd = mean.float(), torch.rsqrt(var + eps).float()
        xhat = (x.float() - _view(mean32, x)) * _view(invstd, x)
        y = xhat * _view(weight.float(), x) + _view(bias.float(), x)
        ctx.save_for_backward(x, weight, mean32, invstd)
        ctx.total = total
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, invstd = ctx.saved_tensors
        dims = _channel_dims(x)
        dy32 = dy.float()
        xhat = (x.float() - _view(mean, x)) * _view(invstd, x)
        local = torch.stack([dy32.sum(dims), (dy32 * xhat).sum(dims)])  # (2,C): db, dw of this process's rows
        sums = local.clone()
        dist.all_reduce(sums)
        scale = _view(weight.float() * invstd, x)
        dx = scale * (dy32 - _view(sums[0] / ctx.total, x) - xhat * _view(sums[1] / ctx.total, x))
        return dx.to(x.dtype), local[1].to(weight.dtype), local[0].to(weight.dtype), None, None, None, None


class SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over the global batch of all processes (any device, any backend); x (B,C,...) with C channels.
    Affine and with running statistics, as the BatchNorms of the askd models."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"SyncBatchNorm: expected input (B,C,...) of at least 2 dims, got {tuple(x.shape)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and active()):
            return super().forward(x)
        self._check_input_dim(x)
        momentum = self.momentum
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if momentum is None:  # cumulative moving average, as BatchNorm
                momentum = 1.0 / float(self.num_batches_tracked)
        running = (self.running_mean, self.running_var) if self.track_running_stats else (None, None)
        return _SyncBatchNormFunction.apply(x, self.weight, self.bias, *running, self.eps, momentum)


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` with every BatchNorm*d replaced by a SyncBatchNorm sharing its parameters and buffers:
    PyTorch's on CUDA, :class:`SyncBatchNorm` elsewhere."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, SyncBatchNorm):
        if not module.affine:
            raise ValueError("convert_sync_batchnorm: only affine BatchNorms (those of the askd models)")
        out = SyncBatchNorm(module.num_features, module.eps, module.momentum, True, module.track_running_stats)
        out.weight, out.bias = module.weight, module.bias
        if module.track_running_stats:
            out.running_mean, out.running_var = module.running_mean, module.running_var
            out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
        return out
    for name, child in module.named_children():
        module.add_module(name, convert_sync_batchnorm(child, device))
    return module
