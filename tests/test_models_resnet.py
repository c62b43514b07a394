"""ResNet-CBAM classifiers (issue 18, the paper's section 5.1): names and tasks, shapes of logits, maps and stage
outputs for both stems, parameter counts against torchvision's, the fused CBAM backends inside the models, the input
checks, channels_last, init and create()'s errors.

Shapes stay small (CPU, 2 cores): the CIFAR stem at 16-32 px, the ImageNet stem at 64 px, 224 px once at B = 1.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from op_cases import FUSED, assert_close, interpreted
from torch import nn

from askd import archs, models
from askd.nn import CBAM, ResNetCBAM
from askd.nn.cbam import KINDS

pytestmark = pytest.mark.usefixtures("no_tf32")

RESNET_NAMES = ["resnet101_cbam", "resnet18_cbam", "resnet34_cbam", "resnet50_cbam", "resnet_tiny_cbam"]
IR_NAMES = ["ir100_cbam", "ir18_cbam", "ir34_cbam", "ir50_cbam", "ir_tiny_cbam"]
BLOCKS = {"resnet18_cbam": (2, 2, 2, 2), "resnet50_cbam": (3, 4, 6, 3)}
STAGE_CHANNELS = {"resnet18_cbam": (64, 128, 256, 512), "resnet50_cbam": (256, 512, 1024, 2048)}
# stem -> the downsampling before stage 1, then x2 per stage from stage 2 on
STEM_STRIDE = {"imagenet": 4, "cifar": 1}


def create(name: str, num_classes: int = 10, stem: str = "cifar", seed: int = 0, **kw) -> ResNetCBAM:
    torch.manual_seed(seed)
    return models.create(name, num_classes=num_classes, stem=stem, **kw)


def image(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------------------
# names and tasks


def test_names_list_both_families_and_tasks_split_them():
    assert models.names() == sorted(RESNET_NAMES + IR_NAMES)
    assert models.names("classify") == RESNET_NAMES == archs.TASK_ARCHS["classify"]
    assert models.names("face") == IR_NAMES == archs.TASK_ARCHS["face"] == sorted(archs.ARCHS)
    assert all(models.task_of(n) == "classify" for n in RESNET_NAMES)
    assert all(models.task_of(n) == "face" for n in IR_NAMES)
    for bad in ("resnet18", "", None):
        with pytest.raises(ValueError, match="unknown model"):
            models.task_of(bad)
    with pytest.raises(ValueError, match="unknown task"):
        models.names("detect")


def test_table_rows():
    assert archs.RESNETS["resnet18_cbam"] == ("basic", (2, 2, 2, 2), (64, 64, 128, 256, 512), 16)
    assert archs.RESNETS["resnet50_cbam"] == ("bottleneck", (3, 4, 6, 3), (64, 64, 128, 256, 512), 16)
    assert archs.RESNETS["resnet_tiny_cbam"] == ("basic", (1, 1, 1, 1), (16, 16, 32, 64, 128), 4)


# ---------------------------------------------------------------------------------------------------------------
# shapes

SHAPE_CASES = [
    ("resnet18_cbam", "cifar", 32, 2),
    ("resnet18_cbam", "imagenet", 64, 2),
    ("resnet18_cbam", "imagenet", 224, 1),
    ("resnet50_cbam", "cifar", 32, 1),
    ("resnet50_cbam", "imagenet", 64, 2),
]


@pytest.fixture(scope="module", params=SHAPE_CASES, ids=lambda c: "-".join(map(str, c)))
def built(request):
    """(name, stem, side, B, model, (logits, maps, stages)) of a model in eval mode, run once per case."""
    name, stem, side, b = request.param
    model = create(name, num_classes=7, stem=stem).eval()
    with torch.no_grad():
        out = model(image(b, 3, side, side), stages=True)
    return name, stem, side, b, model, out


def expected_sides(stem: str, side: int) -> list[int]:
    first = side // STEM_STRIDE[stem]
    return [first, first // 2, first // 4, first // 8]


def test_logits_and_stage_outputs(built):
    name, stem, side, b, _, (logits, _, stages) = built
    assert logits.shape == (b, 7) and logits.dtype == torch.float32 and torch.isfinite(logits).all()
    sides = expected_sides(stem, side)
    assert [tuple(s.shape) for s in stages] == [(b, c, h, h) for c, h in zip(STAGE_CHANNELS[name], sides, strict=True)]
    assert all((s >= 0).all() for s in stages)  # after the ReLU


def test_one_map_pair_per_block(built):
    name, stem, side, b, model, (_, maps, _) = built
    assert len(maps) == sum(BLOCKS[name]) == {"resnet18_cbam": 8, "resnet50_cbam": 16}[name]
    assert sum(isinstance(m, CBAM) for m in model.modules()) == len(maps)
    expected = []
    for stage, n in enumerate(BLOCKS[name]):
        expected += [(STAGE_CHANNELS[name][stage], expected_sides(stem, side)[stage])] * n
    for i, ((channel_map, spatial_map), (c, h)) in enumerate(zip(maps, expected, strict=True)):
        assert channel_map.shape == (b, c), f"block {i}"
        assert spatial_map.shape == (b, 1, h, h), f"block {i}"


def test_stems():
    cifar, imagenet = create("resnet_tiny_cbam", stem="cifar"), models.create("resnet_tiny_cbam", num_classes=3)
    assert (cifar.conv1.kernel_size, cifar.conv1.stride, type(cifar.maxpool)) == ((3, 3), (1, 1), nn.Identity)
    assert (imagenet.conv1.kernel_size, imagenet.conv1.stride) == ((7, 7), (2, 2))  # the default stem
    assert isinstance(imagenet.maxpool, nn.MaxPool2d)


@pytest.mark.parametrize("variant", ["official", "paper"])
def test_variant_picks_the_maps_and_the_kernel_stays_7(variant):
    model = create("resnet_tiny_cbam", variant=variant).eval()
    cbams = [m for m in model.modules() if isinstance(m, CBAM)]
    assert [m.spatial.kernel_size for m in cbams] == [(7, 7)] * 4  # Woo et al.'s, in both variants
    assert [m.mlp[0].out_channels for m in cbams] == [16 // 4, 32 // 4, 64 // 4, 128 // 4]
    with torch.no_grad():
        _, maps = model(image(2, 3, 16, 16))
    values = torch.cat([t.flatten() for pair in maps for t in pair])
    if variant == "paper":
        assert (values > 0).all() and (values < 1).all()
    else:
        assert (values < 0).any()  # pre-sigmoid logits


def test_features_and_forward_head_give_the_logits():
    model = create("resnet18_cbam", num_classes=5).eval()
    x = image(2, 3, 16, 16)
    with torch.no_grad():
        logits, maps = model(x)
        features, feature_maps, stages = model(x, stages=True, features=True)
        head = model.forward_head(features)
    assert features.shape == (2, 512) == (2, model.num_features)
    assert torch.equal(head, logits)
    assert torch.equal(features, stages[-1].mean(dim=(2, 3)))  # the pooled last stage
    pairs = zip(maps, feature_maps, strict=True)
    assert all(torch.equal(a, b) for pa, pb in pairs for a, b in zip(pa, pb, strict=True))


# ---------------------------------------------------------------------------------------------------------------
# parameter counts: torchvision's totals (num_classes=1000) plus our CBAM, written out

TORCHVISION_RESNET18 = 11_689_512
TORCHVISION_RESNET50 = 25_557_032


def cbam_params(channels: int, reduction: int = 16, k: int = 7) -> int:
    """Ours: two bias-free 1x1 convs C -> C/r -> C and the bias-free 2 -> 1 spatial k x k conv, no BN."""
    return 2 * channels * (channels // reduction) + 2 * k * k


def test_parameter_counts():
    # one CBAM per block on the block's output channels: ResNet-18 2 blocks per stage on 64..512 channels,
    # ResNet-50 3, 4, 6, 3 blocks on 256..2048
    resnet18_cbam = TORCHVISION_RESNET18 + sum(2 * cbam_params(c) for c in (64, 128, 256, 512))
    resnet50_blocks = zip((3, 4, 6, 3), (256, 512, 1024, 2048), strict=True)
    resnet50_cbam = TORCHVISION_RESNET50 + sum(n * cbam_params(c) for n, c in resnet50_blocks)
    assert resnet18_cbam == 11_689_512 + 87_040 + 8 * 98 == 11_777_336
    assert resnet50_cbam == 25_557_032 + 2_514_944 + 16 * 98 == 28_073_544
    for name, want in (("resnet18_cbam", resnet18_cbam), ("resnet50_cbam", resnet50_cbam)):
        model = models.create(name, num_classes=1000)
        assert sum(p.numel() for p in model.parameters()) == want, name


def test_torchvision_module_names():
    """conv1, bn1, layerK.i.{convJ,bnJ,downsample.{0,1}}, fc: a torchvision state dict loads with strict=False."""
    keys = models.create("resnet50_cbam", num_classes=1000).state_dict()
    layout = re.compile(r"(conv1|bn1|fc|layer[1-4]\.\d+\.(conv[123]|bn[123]|downsample\.[01]))\.\w+")
    assert [k for k in keys if ".cbam." not in k and not layout.fullmatch(k)] == []
    assert {"layer1.0.downsample.0.weight", "layer4.2.bn3.running_var", "fc.bias"} <= set(keys)
    assert "layer1.0.downsample.0.weight" not in models.create("resnet18_cbam", num_classes=10).state_dict()


# ---------------------------------------------------------------------------------------------------------------
# fused CBAM inside the models


def outputs_and_grads(model: nn.Module, x: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """Logits, every map, and the gradients of x and every parameter for a loss touching all of them."""
    x = x.detach().requires_grad_()
    logits, maps = model(x)
    loss = logits.square().sum() + sum(c.sin().sum() + s.cos().sum() for c, s in maps)
    params = list(model.named_parameters())
    grads = torch.autograd.grad(loss, [x] + [p for _, p in params])
    got = [("logits", logits)]
    got += [(f"block {i} {kind}", m) for i, pair in enumerate(maps) for kind, m in zip(KINDS, pair, strict=True)]
    return got + [("dx", grads[0])] + [(f"d{n}", g) for (n, _), g in zip(params, grads[1:], strict=True)]


# eval in float32 at op_cases' tolerances (BN a fixed affine map, as in inference and for a frozen teacher); train
# in float64 at its tolerances. Train mode in float32 cannot be compared at these sizes: BN then normalises each
# channel over 2 to 8 values, which magnifies rounding far beyond any op's tolerance (the torch backend alone in
# float32 is off from float64 by up to 4x the largest gradient, resnet50_cbam at 8 px, 16 px: 0.16x).
MODE_DTYPES = {"eval": torch.float32, "train": torch.float64}


@pytest.mark.parametrize("mode", MODE_DTYPES)
@pytest.mark.parametrize("name", ["resnet18_cbam", "resnet50_cbam"])
@FUSED
def test_fused_cbam_matches_torch_inside_the_model(backend, device, name, mode):
    dtype, side = MODE_DTYPES[mode], 16
    if interpreted(backend, device):
        if (name, mode) != ("resnet18_cbam", "eval"):
            pytest.skip("the Triton interpreter takes 8-45 s per case here: resnet18_cbam in eval mode stands for it")
        side = 8
    ref = create(name, backend="torch").to(device, dtype).train(mode == "train")
    fused = create(name, backend=backend).to(device, dtype).train(mode == "train")
    fused.load_state_dict(ref.state_dict())
    x = image(2, 3, side, side).to(device, dtype)
    for (label, got), (_, want) in zip(outputs_and_grads(fused, x), outputs_and_grads(ref, x), strict=True):
        assert_close(f"{name} {backend} {label}", got, want)


# ---------------------------------------------------------------------------------------------------------------
# input checks


@pytest.mark.parametrize(
    "stem,shape,message",
    [
        ("cifar", (3, 32, 32), r"\(B,3,H,W\) with H, W >= 8 \(the cifar stem's total stride\), got \(3, 32, 32\)"),
        ("cifar", (1, 1, 32, 32), r"expected input of shape \(B,3,H,W\)"),
        ("cifar", (1, 4, 32, 32), r"expected input of shape"),
        ("cifar", (1, 3, 7, 32), r"H, W >= 8"),
        ("cifar", (1, 3, 32, 7), r"H, W >= 8"),
        ("imagenet", (1, 3, 31, 64), r"H, W >= 32 \(the imagenet stem's total stride\)"),
        ("imagenet", (1, 3, 32, 31, 1), r"expected input of shape"),
    ],
)
def test_wrong_input_shape_raises(stem, shape, message):
    model = create("resnet_tiny_cbam", stem=stem).eval()
    with pytest.raises(ValueError, match=message):
        model(torch.zeros(shape))


def test_smallest_inputs_run():
    for stem, side in (("cifar", 8), ("imagenet", 32)):
        model = create("resnet_tiny_cbam", stem=stem).eval()
        with torch.no_grad():
            logits, maps = model(image(1, 3, side, side))
        assert logits.shape == (1, 10) and maps[-1][1].shape == (1, 1, 1, 1)


def test_wrong_input_types_raise():
    model = create("resnet_tiny_cbam").eval()
    with pytest.raises(TypeError, match=r"expected input a tensor \(B,3,H,W\)"):
        model([[0.0] * 16] * 3)
    with pytest.raises(ValueError, match=r"expected input floating point, got torch.uint8"):
        model(torch.zeros(1, 3, 16, 16, dtype=torch.uint8))
    for dtype in (torch.float64, torch.bfloat16):
        with pytest.raises(ValueError, match=rf"expected input of the model's dtype torch.float32, got {dtype}"):
            model(torch.zeros(1, 3, 16, 16, dtype=dtype))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits, _ = model(torch.zeros(1, 3, 16, 16, dtype=torch.bfloat16))  # autocast: fine
    assert logits.shape == (1, 10)


def test_channels_last_gives_the_same_result():
    model = create("resnet18_cbam").eval()
    x = image(2, 3, 16, 16)
    with torch.no_grad():
        want_logits, want_maps = model(x)
        got_logits, got_maps = model(x.contiguous(memory_format=torch.channels_last))
        cl_logits, _ = model.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
    assert_close("logits", got_logits, want_logits)
    assert_close("logits, channels_last model", cl_logits, want_logits)
    for i, (got, want) in enumerate(zip(got_maps, want_maps, strict=True)):
        assert_close(f"block {i} channel", got[0], want[0])
        assert_close(f"block {i} spatial", got[1], want[1])


# ---------------------------------------------------------------------------------------------------------------
# training, init, create()


def test_train_mode_backward_reaches_every_parameter_without_hooks():
    model = create("resnet_tiny_cbam").train()
    logits, maps, stages = model(image(2, 3, 16, 16), stages=True)
    loss = logits.square().mean() + sum(c.mean() + s.mean() for c, s in maps) + sum(s.mean() for s in stages)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert not any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks for m in model.modules())


def test_init_as_torchvision_and_cbam_as_built():
    model = create("resnet18_cbam", num_classes=1000)
    cbam_convs = {id(m) for c in model.modules() if isinstance(c, CBAM) for m in c.modules()}
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            fan_in, fan_out = m.weight[0].numel(), m.weight.shape[0] * m.weight[0, 0].numel()
            if id(m) in cbam_convs:  # nn.Conv2d's default: uniform within 1/sqrt(fan_in)
                assert m.weight.abs().max() <= 1 / math.sqrt(fan_in) + 1e-7
            elif m.weight.numel() > 10_000:  # kaiming normal, fan_out, ReLU gain: std sqrt(2 / fan_out)
                assert m.weight.std().item() == pytest.approx(math.sqrt(2 / fan_out), rel=0.05)
        elif isinstance(m, nn.BatchNorm2d):
            assert torch.equal(m.weight, torch.ones_like(m.weight)) and torch.equal(m.bias, torch.zeros_like(m.bias))
    bound = 1 / math.sqrt(512)  # nn.Linear's default
    assert model.fc.weight.abs().max() <= bound and model.fc.bias.abs().max() <= bound


def test_zero_init_residual_zeroes_each_branch_last_bn():
    for name, last in (("resnet_tiny_cbam", "bn2"), ("resnet50_cbam", "bn3")):
        model = create(name, zero_init_residual=True)
        zeroed = [k for k, v in model.state_dict().items() if k.endswith(".weight") and v.numel() and not v.any()]
        assert zeroed and all(re.fullmatch(rf"layer[1-4]\.\d+\.{last}\.weight", k) for k in zeroed), name
        assert len(zeroed) == sum(isinstance(m, CBAM) for m in model.modules())


def test_reduction_and_backend_keywords_reach_every_cbam():
    model = create("resnet_tiny_cbam", reduction=2, backend="ext")
    cbams = [m for m in model.modules() if isinstance(m, CBAM)]
    assert [m.mlp[0].out_channels for m in cbams] == [8, 16, 32, 64]
    assert {m.backend for m in cbams} == {"ext"}


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({}, r"num_classes must be a positive int \(the classes to predict\), got None"),
        ({"num_classes": 0}, r"num_classes must be a positive int"),
        ({"num_classes": True}, r"num_classes must be a positive int"),
        ({"num_classes": 2.0}, r"num_classes must be a positive int"),
        ({"num_classes": 10, "stem": "tiny"}, r"unknown stem 'tiny'; expected one of \['imagenet', 'cifar'\]"),
        ({"num_classes": 10, "variant": "nope"}, r"unknown variant 'nope'"),
        ({"num_classes": 10, "backend": "nope"}, r"unknown backend 'nope'"),
        ({"num_classes": 10, "embedding_size": 0}, r"embedding_size must be a positive int"),
    ],
)
def test_create_refuses_bad_resnet_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        models.create("resnet_tiny_cbam", **kwargs)


@pytest.mark.parametrize("kwargs", [{"num_classes": 10}, {"stem": "cifar"}, {"num_classes": None, "stem": "imagenet"}])
def test_create_refuses_classifier_arguments_for_face_nets(kwargs):
    with pytest.raises(ValueError, match=r"is for the ResNet classifiers .*resnet18_cbam.*; ir_tiny_cbam is a face"):
        models.create("ir_tiny_cbam", **kwargs)


def test_unknown_name_lists_both_families():
    with pytest.raises(ValueError) as exc:
        models.create("resnet18", num_classes=10)
    assert all(n in str(exc.value) for n in RESNET_NAMES + IR_NAMES)
