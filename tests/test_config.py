"""The training config: defaults, TOML files, presets, flags and --set overrides, their errors, the old names of
renamed keys, the learning-rate schedule."""

import subprocess
import sys
import warnings
from importlib import resources
from pathlib import Path

import pytest

from askd.config import Config, ConfigError, apply, load_toml, parse_set, presets, resolve_config, to_toml
from askd.train import lr_factor, parse_args


def test_defaults_are_valid_and_the_cpu_demo():
    cfg = parse_args([])
    assert cfg == Config()
    assert (cfg.arch, cfg.variant, cfg.data, cfg.method) == ("ir_tiny_cbam", "official", "synthetic", "base,askd")
    assert cfg.low_res_side() == 14


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
        (["--arch", "typo"], "'arch': got 'typo', expected one of ['ir100_cbam', 'ir18_cbam'"),
        (["--method", "base,magic"], "'method': unknown method 'magic'"),
            (["--method", "askd,askd+at+askd"], "names a part twice"),
            (["--method", "askd_kd,askd+kd"], "the student askd+kd twice"),
            (["--assistant", "ir7"], "'assistant': got 'ir7'"),
            (["--method", "horkd,askd_sa", "--assistant", "ir18_cbam"], "askd_sa compares maps block by block"),
        (["--amp", "fp8"], "'amp': got 'fp8'"),
        (["--set", "low_res_size=2"], "'low_res_size': got 2"),
        (["--set", "milestones=[0.5, 1.5]"], "'milestones'"),
    ],
)
def test_bad_overrides_name_the_key(args, needle):
    with pytest.raises(ConfigError) as e:
        parse_args(args)
    assert needle in str(e.value)


def test_renamed_keys_and_their_flags():
    """``phases`` and ``low_res_size`` were ``stage`` and ``lr_size``: the flags keep both spellings, silently."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        for argv in (["--phases", "teacher", "--low-res-size", "20"], ["--stage", "teacher", "--lr-size", "20"]):
            cfg = parse_args(argv)
            assert (cfg.phases, cfg.low_res_size, cfg.low_res_side()) == ("teacher", 20, 20)
    assert "phases = " in to_toml(cfg) and "stage" not in to_toml(cfg) and "lr_size" not in to_toml(cfg)


def test_old_key_names_warn_and_still_work(tmp_path):
    old = tmp_path / "old.toml"
    old.write_text('stage = "student"\nlr_size = 28\n')  # a config.toml of an older version
    deprecated = ["config key 'stage' is deprecated; use 'phases'",
                  "config key 'lr_size' is deprecated; use 'low_res_size'"]
    with pytest.warns(DeprecationWarning) as caught:
        cfg = parse_args(["--config", str(old)])
    assert [str(w.message) for w in caught] == [f"{old}: {message}" for message in deprecated]
    assert (cfg.phases, cfg.low_res_size) == ("student", 28)
    with pytest.warns(DeprecationWarning) as caught:
        cfg = parse_args(["--set", "lr_size=20", "--set", "stage=teacher"])
    assert [str(w.message) for w in caught] == [f"--set: {message}" for message in deprecated]
    assert (cfg.phases, cfg.low_res_size) == ("teacher", 20)
    with pytest.warns(DeprecationWarning, match="'stage'"), pytest.raises(ConfigError, match="'phases': got 'both'"):
        parse_args(["--set", "stage=both"])
    with pytest.raises(ConfigError, match="'stage' is the old name of 'phases'; give only 'phases'"):
        parse_args(["--set", "stage=teacher", "--set", "phases=student"])
    with pytest.warns(DeprecationWarning, match=r"Config.lr_side is deprecated; use Config.low_res_side"):
        assert cfg.lr_side() == 20
    with pytest.warns(DeprecationWarning, match=r"Config.stage is deprecated; use Config.phases"):
        assert cfg.stage == "teacher"
    with pytest.raises(AttributeError, match="no attribute 'stages'"):
        cfg.stages  # noqa: B018


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


REPO = Path(__file__).resolve().parents[1]


def test_presets_by_name_from_the_package_not_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs/ here
    assert sorted(presets()) == ["imagenet_4x", "official_ir50", "paper_ir50"]
    official, paper = parse_args(["--config", "official_ir50"]), parse_args(["--config", "paper_ir50"])
    assert (official.arch, official.variant, official.eval_protocol) == ("ir50_cbam", "official", "askd")
    assert (paper.variant, paper.eval_protocol) == ("paper", "insightface")
    imagenet = parse_args(["--config", "imagenet_4x"])  # the A-SKD supplement's ImageNet recipe
    assert (imagenet.task, imagenet.arch, imagenet.batch_size, imagenet.lr, imagenet.epochs) == \
        ("classify", "resnet50_cbam", 1024, 0.4, 90)
    assert (imagenet.input_side(), imagenet.low_res_side(), imagenet.weight_decay) == (224, 56, 1e-4)
    # the package data is the top-level configs/ itself, not a copy that could drift
    assert resolve_config("paper_ir50") == resources.files("askd") / "configs" / "paper_ir50.toml"
    assert resolve_config("paper_ir50").read_bytes() == (REPO / "configs" / "paper_ir50.toml").read_bytes()
    with pytest.raises(ConfigError, match="no such preset; presets: imagenet_4x, official_ir50, paper_ir50"):
        parse_args(["--config", "official"])
    with pytest.raises(ConfigError, match="config file not found: configs/official_ir50.toml"):
        parse_args(["--config", "configs/official_ir50.toml"])  # a path is a path, from where it is given
    (tmp_path / "official_ir50").write_text("epochs = 3\n")
    assert parse_args(["--config", "official_ir50"]).epochs == 3  # a file of that name goes first


def test_config_does_not_load_the_models():
    """askd.config checks arch names from askd.archs: no torch, no compiled extension."""
    probe = "import sys, askd.config; print(sorted(m for m in ('torch', 'askd.models', 'askd._C') if m in sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True).stdout
    assert loaded.strip() == "[]"


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
