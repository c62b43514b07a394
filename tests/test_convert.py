"""``python -m askd.convert``: the authors' CBAMResNet(50) checkpoints <-> askd ir50_cbam/official.

The authors' layout is written out here from their ``model/backbone.py`` (gist-ailab/teaching-where-to-look) as
this test reads it, independently of askd.convert's mapping: their names in their order, with the shapes their
modules give them. A forward written here on their names (F.conv2d, F.batch_norm, ...) checks that the converted
askd model computes what their network does. IR-50 holds 43.9M parameters: state dicts are fine, forwards use B=1.
"""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F

from askd import checkpoint, convert, export, models
from askd.config import Config
from askd.eval import cli as eval_cli
from askd.train.pipeline import load_frozen

BLOCKS = (3, 4, 14, 3)  # their get_layers(50)
WIDTHS = (64, 64, 128, 256, 512)  # their filter_list
EMBEDDING = 512
CLASSES = 7


def bn_entries(prefix: str, c: int) -> list[tuple[str, tuple]]:
    return [(prefix + n, (c,)) for n in ("weight", "bias", "running_mean", "running_var")] + [
        (prefix + "num_batches_tracked", ())
    ]


def official_layout(blocks=BLOCKS, widths=WIDTHS, embedding=EMBEDDING) -> list[tuple[str, tuple]]:
    """(name, shape) of CBAMResNet(num_layers).state_dict(), in order: input_layer (conv, BN, PReLU); per stage s
    and block j a BottleNeck_IR_CBAM (res_layer BN conv BN PReLU conv BN, channel_layer.shared_mlp 1x1 convs of
    reduction 16, spatial_layer.conv 3x3, shortcut_layer conv1x1 + BN in the stage's first block only);
    output_layer (BN2d, Dropout, Flatten, Linear 512*7*7 -> E, BN1d)."""
    c0 = widths[0]
    keys = [("input_layer.0.weight", (c0, 3, 3, 3)), *bn_entries("input_layer.1.", c0), ("input_layer.2.weight", (c0,))]
    for s, n in enumerate(blocks, 1):
        for j in range(n):
            cin, c, p = widths[s - 1] if j == 0 else widths[s], widths[s], f"layer{s}.{j}."
            keys += [*bn_entries(p + "res_layer.0.", cin), (p + "res_layer.1.weight", (c, cin, 3, 3))]
            keys += [*bn_entries(p + "res_layer.2.", c), (p + "res_layer.3.weight", (c,))]
            keys += [(p + "res_layer.4.weight", (c, c, 3, 3)), *bn_entries(p + "res_layer.5.", c)]
            keys += [(p + "channel_layer.shared_mlp.0.weight", (c // 16, c, 1, 1))]
            keys += [(p + "channel_layer.shared_mlp.2.weight", (c, c // 16, 1, 1))]
            keys += [(p + "spatial_layer.conv.weight", (1, 2, 3, 3))]
            if j == 0:
                keys += [(p + "shortcut_layer.0.weight", (c, cin, 1, 1)), *bn_entries(p + "shortcut_layer.1.", c)]
    last = widths[-1]
    keys += [*bn_entries("output_layer.0.", last), ("output_layer.3.weight", (embedding, last * 49))]
    keys += [("output_layer.3.bias", (embedding,)), *bn_entries("output_layer.4.", embedding)]
    return keys


def random_state(layout, seed: int = 0) -> OrderedDict:
    """Tensors of ``layout`` that keep a 24-block forward in range: fan-in-scaled convs, BN near the identity
    but not at it (so that the conversion must carry every statistic), PReLU slopes near 0.25."""
    gen = torch.Generator().manual_seed(seed)
    state = OrderedDict()
    for name, shape in layout:
        leaf = name.rsplit(".", 1)[1]
        if leaf == "num_batches_tracked":
            state[name] = torch.tensor(int(torch.randint(1, 10**6, (), generator=gen)))
        elif leaf == "running_var":
            state[name] = 1 + 0.2 * torch.rand(shape, generator=gen)
        elif len(shape) > 1:
            fan_in = torch.Size(shape[1:]).numel()
            state[name] = torch.randn(shape, generator=gen) * (0.7 / fan_in**0.5)
        elif name in ("input_layer.2.weight",) or name.endswith("res_layer.3.weight"):  # PReLU slope
            state[name] = 0.25 + 0.05 * torch.randn(shape, generator=gen)
        elif leaf == "weight":  # BN scale
            state[name] = 1 + 0.1 * torch.randn(shape, generator=gen)
        else:  # biases, running means
            state[name] = 0.1 * torch.randn(shape, generator=gen)
    return state


def bn(x, sd, p):
    return F.batch_norm(x, sd[p + "running_mean"], sd[p + "running_var"], sd[p + "weight"], sd[p + "bias"], False,
                        0.0, 1e-5)


def official_forward(sd, x):
    """Their CBAMResNet.forward in eval mode, on their key names: x (B,3,112,112) -> embedding (B,E)."""
    x = bn(F.conv2d(x, sd["input_layer.0.weight"], padding=1), sd, "input_layer.1.")
    x = F.prelu(x, sd["input_layer.2.weight"])
    for s, n in enumerate(BLOCKS, 1):
        for j in range(n):
            p, stride = f"layer{s}.{j}.", 2 if j == 0 else 1
            r = F.conv2d(bn(x, sd, p + "res_layer.0."), sd[p + "res_layer.1.weight"], padding=1)
            r = F.prelu(bn(r, sd, p + "res_layer.2."), sd[p + "res_layer.3.weight"])
            r = bn(F.conv2d(r, sd[p + "res_layer.4.weight"], stride=stride, padding=1), sd, p + "res_layer.5.")
            w0, w2 = sd[p + "channel_layer.shared_mlp.0.weight"], sd[p + "channel_layer.shared_mlp.2.weight"]

            def mlp(v, w0=w0, w2=w2):
                return F.conv2d(F.relu(F.conv2d(v, w0)), w2)

            r = r * torch.sigmoid(mlp(F.adaptive_avg_pool2d(r, 1)) + mlp(F.adaptive_max_pool2d(r, 1)))
            pooled = torch.cat([r.mean(1, keepdim=True), r.amax(1, keepdim=True)], 1)
            r = r * torch.sigmoid(F.conv2d(pooled, sd[p + "spatial_layer.conv.weight"], padding=1))
            if j == 0:
                x = bn(F.conv2d(x, sd[p + "shortcut_layer.0.weight"], stride=stride), sd, p + "shortcut_layer.1.")
            x = x + r
    x = bn(x, sd, "output_layer.0.").view(x.shape[0], -1)  # Dropout is the identity in eval
    return bn(F.linear(x, sd["output_layer.3.weight"], sd["output_layer.3.bias"]), sd, "output_layer.4.")


def askd_model(state: dict) -> torch.nn.Module:
    model = models.create("ir50_cbam", "official", EMBEDDING, backend="torch")
    model.load_state_dict(state)  # strict: the converted state is exactly askd's layout
    return model.eval()


def prefixed(state: dict) -> OrderedDict:
    return OrderedDict(("module." + k, v) for k, v in state.items())


@pytest.fixture(scope="module")
def official():
    return random_state(official_layout())


@pytest.fixture(scope="module")
def margin():
    return OrderedDict(weight=torch.randn(CLASSES, EMBEDDING, generator=torch.Generator().manual_seed(1)))


@pytest.fixture(scope="module")
def files(tmp_path_factory, official, margin):
    """Their two files as train_teacher.py writes them."""
    d = tmp_path_factory.mktemp("official")
    torch.save({"iters": 47000, "net_state_dict": official}, d / "last_net.ckpt")
    torch.save({"iters": 47000, "net_state_dict": margin}, d / "last_margin.ckpt")
    return d / "last_net.ckpt", d / "last_margin.ckpt"


@pytest.fixture(scope="module")
def converted(tmp_path_factory, files):
    net, margin = files
    out = tmp_path_factory.mktemp("askd") / "teacher.pt"
    assert convert.main(["official", str(net), "--margin", str(margin), "--out", str(out)]) == 0
    return out


# the mapping


@pytest.mark.parametrize("wrap", [lambda s: s, prefixed], ids=["plain", "module."])
def test_their_state_maps_key_by_key(official, margin, wrap):
    model, head = convert.from_official(wrap(official), wrap(margin), input_order="rgb")
    ours = askd_model(model).state_dict()
    assert list(model) == list(ours)  # askd's order
    assert len(model) == len(official) == 547
    for (theirs, src), (name, got) in zip(official.items(), model.items(), strict=True):  # same order both sides
        assert torch.equal(got, src), (theirs, name)
        assert torch.equal(ours[name], src), (theirs, name)
    assert torch.equal(head["weight"], margin["weight"])


def test_mapping_names(official):
    pairs = dict(zip(official, convert.from_official(official, input_order="rgb")[0], strict=True))
    assert pairs["input_layer.2.weight"] == "stem.2.weight"
    assert pairs["layer1.0.shortcut_layer.1.running_var"] == "blocks.0.shortcut.1.running_var"
    assert pairs["layer2.0.res_layer.4.weight"] == "blocks.3.res.4.weight"
    assert pairs["layer3.13.channel_layer.shared_mlp.2.weight"] == "blocks.20.cbam.mlp.2.weight"
    assert pairs["layer4.2.spatial_layer.conv.weight"] == "blocks.23.cbam.spatial.weight"
    assert pairs["output_layer.3.bias"] == "head.3.bias"


def test_bgr_reverses_the_stem_conv_channels_only(official):
    rgb = convert.from_official(official, input_order="rgb")[0]
    bgr = convert.from_official(official, input_order="bgr")[0]
    assert torch.equal(bgr["stem.0.weight"], official["input_layer.0.weight"][:, [2, 1, 0]])
    assert all(torch.equal(bgr[k], rgb[k]) for k in rgb if k != "stem.0.weight")


@pytest.mark.parametrize("order", ["bgr", "rgb"])
def test_official_askd_official_is_the_identity(official, margin, order):
    model, head = convert.from_official(official, margin, input_order=order)
    back, back_margin = convert.to_official(model, head, input_order=order)
    assert list(back) == list(official)
    assert all(torch.equal(back[k], official[k]) and back[k].dtype == official[k].dtype for k in official)
    assert list(back_margin) == ["weight"] and torch.equal(back_margin["weight"], margin["weight"])


def test_the_converted_model_computes_their_network(official):
    """askd on RGB == their forward on the same image in BGR; and the weights fed back through the reverse
    mapping give the same embedding bit for bit."""
    x = torch.rand(1, 3, 112, 112, generator=torch.Generator().manual_seed(2)) * 2 - 1
    model = askd_model(convert.from_official(official)[0])
    with torch.no_grad():
        emb = model(x)[0]
        ref = official_forward(official, x.flip(1))  # their loaders feed BGR
        again = askd_model(convert.from_official(convert.to_official(model.state_dict())[0])[0])(x)[0]
    assert emb.abs().max() > 0.1 and torch.isfinite(emb).all()
    torch.testing.assert_close(emb, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
    assert torch.equal(again, emb)


def test_ir100_is_cbamresnet_100():
    layout = official_layout(blocks=(3, 13, 30, 3))
    meta = OrderedDict((k, torch.empty(s, device="meta")) for k, s in layout)
    model, _ = convert.from_official(meta, arch="ir100_cbam")
    assert list(model) == list(convert.askd_layout("ir100_cbam", EMBEDDING))


# refusals


def renamed(state, old, new):
    return OrderedDict((new if k == old else k, v) for k, v in state.items())


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda s: renamed(s, "layer2.1.spatial_layer.conv.weight", "layer2.1.spatial_layer.cv.weight"),
         "unexpected key 'layer2.1.spatial_layer.cv.weight'"),
        (lambda s: OrderedDict(s, **{"layer2.1.spatial_layer.conv.weight": torch.zeros(1, 2, 7, 7)}),
         "'layer2.1.spatial_layer.conv.weight' has shape (1, 2, 7, 7), expected (1, 2, 3, 3)"),
        (lambda s: OrderedDict(s, **{"layer4.3.res_layer.0.weight": torch.zeros(512)}),
         "unexpected key 'layer4.3.res_layer.0.weight'"),
        (lambda s: OrderedDict((k, v) for k, v in s.items() if k != "layer1.1.res_layer.2.num_batches_tracked"),
         "missing key 'layer1.1.res_layer.2.num_batches_tracked'"),
        (lambda s: OrderedDict((k if k.startswith("layer") else "module." + k, v) for k, v in s.items()),
         "unexpected key 'module.input_layer.0.weight'"),
    ],
    ids=["wrong-key", "wrong-shape", "extra-key", "missing-key", "mixed-prefix"],
)
def test_a_layout_that_does_not_fit_is_refused_by_name(official, change, message):
    with pytest.raises(convert.ConvertError, match="CBAMResNet\\(50\\): ") as e:
        convert.from_official(change(official))
    assert message in str(e.value)


def test_a_margin_of_another_width_is_refused(official):
    with pytest.raises(convert.ConvertError, match=r"ArcMarginProduct: 'weight' has shape \(7, 128\)"):
        convert.from_official(official, OrderedDict(weight=torch.zeros(CLASSES, 128)))


def test_an_askd_model_without_a_counterpart_is_refused():
    with pytest.raises(convert.ConvertError, match="arch 'ir_tiny_cbam' has no counterpart"):
        convert.to_official(models.create("ir_tiny_cbam").state_dict(), arch="ir_tiny_cbam")


# the command line and the readers of the checkpoint it writes


def test_eval_export_and_teacher_read_the_converted_checkpoint(converted, official, margin):
    model, ckpt = checkpoint.load_model(converted, expect={"arch": "ir50_cbam", "variant": "official"})
    assert (ckpt["role"], ckpt["step"], ckpt["num_classes"]) == ("teacher", 47000, CLASSES)
    spatial = model.state_dict()["blocks.5.cbam.spatial.weight"]
    assert torch.equal(spatial, official["layer2.2.spatial_layer.conv.weight"])
    loaded = eval_cli.load(str(converted), eval_cli.parser().parse_args(["verify", "x", "--bin", "y"]), "cpu")
    assert (loaded.role, loaded.low_res_size) == ("teacher", None)  # evaluated on HR
    assert isinstance(export.load_model(converted)[0], export.EmbeddingOnly)
    teacher, head = load_frozen(converted, Config(arch="ir50_cbam"), "ir50_cbam", torch.device("cpu"))
    assert torch.equal(head.weight, margin["weight"]) and not head.weight.requires_grad


def test_a_student_records_its_low_resolution(tmp_path, files):
    out = tmp_path / "student.pt"
    assert convert.main(["official", str(files[0]), "--low-res-size", "28", "--out", str(out)]) == 0
    loaded = eval_cli.load(str(out), eval_cli.parser().parse_args(["verify", "x", "--bin", "y"]), "cpu")
    assert (loaded.role, loaded.low_res_size, loaded.variant) == ("student converted", 28, "official")
    assert "head" not in torch.load(out, weights_only=False)
    # as a --teacher it needs the margin: a clear error, not a KeyError
    with pytest.raises(checkpoint.CheckpointError, match="no ArcFace head .* --margin"):
        load_frozen(out, Config(arch="ir50_cbam"), "ir50_cbam", torch.device("cpu"))


def test_to_official_writes_their_files_back(tmp_path, converted, files, official, margin):
    net, marg = tmp_path / "Iter_net.ckpt", tmp_path / "Iter_margin.ckpt"
    assert convert.main(["to-official", str(converted), "--out", str(net), "--margin-out", str(marg)]) == 0
    got, got_margin = torch.load(net, weights_only=True), torch.load(marg, weights_only=True)
    assert got["iters"] == 47000 and list(got["net_state_dict"]) == list(official)
    assert all(torch.equal(got["net_state_dict"][k], v) for k, v in official.items())
    assert torch.equal(got_margin["net_state_dict"]["weight"], margin["weight"])


def test_to_official_refuses_the_paper_variant(tmp_path, capsys):
    src = tmp_path / "paper.pt"
    model = models.create("ir_tiny_cbam", "paper")  # the variant is refused before the arch is looked at
    checkpoint.save_atomic({"model": model.state_dict(), "arch": "ir_tiny_cbam", "variant": "paper",
                            "embedding_size": 512}, src)
    assert convert.main(["to-official", str(src), "--out", str(tmp_path / "net.ckpt")]) == 2
    assert "variant 'paper'" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["paper.pt"]


def test_the_cli_writes_nothing_on_refusal(tmp_path, official, capsys):
    bad = tmp_path / "bad_net.ckpt"
    torch.save({"iters": 1, "net_state_dict": renamed(official, "output_layer.3.bias", "output_layer.3.b")}, bad)
    out = tmp_path / "out" / "teacher.pt"
    assert convert.main(["official", str(bad), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("askd.convert: error: CBAMResNet(50): unexpected key 'output_layer.3.b'")
    assert err.count("\n") == 1 and not out.parent.exists()


@pytest.mark.parametrize(
    "content, message",
    [
        (b"\x00not a checkpoint at all", "cannot read network checkpoint"),
        (None, "no 'net_state_dict' entry"),
    ],
    ids=["corrupt", "other-dict"],
)
def test_an_unreadable_file_gives_one_line(tmp_path, capsys, content, message):
    src = tmp_path / "x_net.ckpt"
    if content is None:
        torch.save({"state_dict": {}}, src)
    else:
        src.write_bytes(content)
    assert convert.main(["official", str(src), "--out", str(tmp_path / "o.pt")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x_net.ckpt"]


def test_an_askd_checkpoint_given_as_theirs_says_which_way(tmp_path, converted, capsys):
    assert convert.main(["official", str(converted), "--out", str(tmp_path / "o.pt")]) == 2
    assert "is an askd checkpoint" in capsys.readouterr().err
