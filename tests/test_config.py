"""The training config: defaults, TOML files, flags and --set overrides, their errors, the LR schedule."""

import pytest

from askd.config import Config, ConfigError, apply, load_toml, parse_set, to_toml
from askd.train import lr_factor, parse_args


def test_defaults_are_valid_and_the_cpu_demo():
    cfg = parse_args([])
    assert cfg == Config()
    assert (cfg.arch, cfg.variant, cfg.data, cfg.method) == ("ir_tiny_cbam", "official", "synthetic", "base,askd")
    assert cfg.lr_side() == 14


def test_set_overrides_are_typed():
    cfg = parse_args(["--set", "lr=0.05", "--set", "channels_last=true", "--set", "epochs=3",
                      "--set", "milestones=[0.5, 0.9]"])
    assert cfg.lr == 0.05 and cfg.channels_last is True and cfg.epochs == 3 and cfg.milestones == [0.5, 0.9]


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--set", "learning_rate=0.1"], "unknown config key 'learning_rate'"),
        (["--set", "epochs=three"], "'epochs': expected int, got 'three'"),
        (["--set", "channels_last=maybe"], "'channels_last': expected bool"),
        (["--set", "novalue"], "--set expects key=value"),
        (["--scale", "3"], "'scale': got 3, expected one of [2, 4, 8]"),
        (["--variant", "fancy"], "'variant': got 'fancy'"),
        (["--method", "base,magic"], "'method': got 'base,magic'"),
        (["--amp", "fp8"], "'amp': got 'fp8'"),
        (["--set", "lr_size=2"], "'lr_size': got 2"),
        (["--set", "milestones=[0.5, 1.5]"], "'milestones'"),
    ],
)
def test_bad_overrides_name_the_key(args, needle):
    with pytest.raises(ConfigError) as e:
        parse_args(args)
    assert needle in str(e.value)


def test_precedence_file_then_flags_then_set(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('arch = "ir18_cbam"\nepochs = 7\nbatch_size = 32\nlr = 1\n')
    cfg = parse_args(["--config", str(path), "--epochs", "9", "--set", "batch_size=16"])
    assert (cfg.arch, cfg.epochs, cfg.batch_size, cfg.lr) == ("ir18_cbam", 9, 16, 1.0)
    cfg = parse_args(["--config", str(path), "--epochs", "9", "--set", "epochs=11"])
    assert cfg.epochs == 11


def test_config_file_errors(tmp_path):
    bad_key = tmp_path / "bad.toml"
    bad_key.write_text("epoch = 3\n")
    with pytest.raises(ConfigError, match=r"bad.toml: unknown config key 'epoch'"):
        parse_args(["--config", str(bad_key)])
    broken = tmp_path / "broken.toml"
    broken.write_text("epochs = = 3\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_toml(broken)
    with pytest.raises(ConfigError, match="config file not found"):
        load_toml(tmp_path / "missing.toml")
    table = tmp_path / "table.toml"
    table.write_text("[optim]\nlr = 0.1\n")
    with pytest.raises(ConfigError, match="tables are not supported"):
        load_toml(table)


def test_resolved_config_round_trips_through_toml(tmp_path):
    cfg = apply(Config(), parse_set(["data=/some/where \"quoted\"", "amp=bf16", "epochs=2"]), "test")
    path = tmp_path / "config.toml"
    path.write_text(to_toml(cfg))
    assert apply(Config(), load_toml(path), str(path)) == cfg


def test_shipped_presets_load():
    for name in ("configs/official_ir50.toml", "configs/paper_ir50.toml"):
        cfg = parse_args(["--config", name])
        assert cfg.arch == "ir50_cbam" and cfg.epochs == 20 and cfg.batch_size == 128


def test_lr_schedule_paper_and_the_authors_one_epoch_early_step():
    """20 epochs of 10 steps: /10 at epochs 6, 11, 15, 17 (paper); one epoch earlier in official."""
    recipe = load_toml("configs/official_ir50.toml")
    paper = apply(Config(), {**recipe, "variant": "paper"}, "test")
    official = apply(Config(), recipe, "test")
    spe = 10
    drops_paper = [e for e in range(1, 20) if lr_factor(e * spe, paper, spe) < lr_factor(e * spe - 1, paper, spe)]
    drops_official = [
        e for e in range(1, 20) if lr_factor(e * spe, official, spe) < lr_factor(e * spe - 1, official, spe)
    ]
    assert drops_paper == [6, 11, 15, 17]
    assert drops_official == [5, 10, 14, 16]
    assert lr_factor(0, paper, spe) == 1.0
    assert lr_factor(199, paper, spe) == pytest.approx(1e-4)
