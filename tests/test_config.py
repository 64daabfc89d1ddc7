from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedblend.cli import app
from fedblend.config import config_from_dict, load_config, parse_override
from fedblend.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "configs").rglob("*.toml"))


def test_configs_are_shipped():
    names = {p.relative_to(ROOT / "configs").as_posix() for p in SHIPPED}
    assert {"flan8/local.toml", "flan8/fedit.toml", "flan8/centralized.toml"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_shipped_config_loads(path: Path):
    cfg = load_config(path)
    assert cfg.algorithm
    assert cfg.train.rounds >= 1


def test_overrides_are_typed():
    cfg = config_from_dict({}, ["train.rounds=2", "train.lr=1e-3", "lora.target_modules=[\"q_proj\"]",
                                "name=hello world", "eval.ttp=false"])
    assert cfg.train.rounds == 2 and cfg.train.lr == pytest.approx(1e-3)
    assert cfg.lora.target_modules == ["q_proj"]
    assert cfg.name == "hello world" and cfg.eval.ttp is False
    assert parse_override("a.b=x=y") == (["a", "b"], "x=y")


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["train.roundz=3"], "--set train.roundz=3: unknown key"),
        (["lora.r=0"], "lora.r"),
        (["data.num_clients=0"], "data.num_clients"),
        (["train.rounds=many"], "train.rounds"),
        (["algorithm=fedsgd"], "unknown algorithm 'fedsgd'"),
        (["model.source=path"], "model.path"),
        (["data.train_pattern=clients.json"], "data.train_pattern"),
        (["nosuchsection.key=1"], "--set nosuchsection.key=1: unknown key"),
    ],
)
def test_bad_values_name_the_key(overrides, needle):
    with pytest.raises(ConfigError) as e:
        config_from_dict({}, overrides)
    msg = str(e.value)
    assert needle in msg
    assert "\n" not in msg


def test_bad_toml_and_missing_file(tmp_path: Path):
    bad = tmp_path / "bad.toml"
    bad.write_text("name = \n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "none.toml")


runner = CliRunner()


def _one_line_error(result) -> str:
    out = (result.stderr or "") + (result.stdout or "")
    lines = [line for line in out.strip().splitlines() if line.strip()]
    assert len(lines) == 1, out
    return lines[0]


def test_cli_bad_config_exits_2(tmp_path: Path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('algorithm = "fedit"\n[lora]\nr = 0\n')
    result = runner.invoke(app, ["run", str(cfg), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert "lora.r" in _one_line_error(result)
    assert not (tmp_path / "run").exists()


def test_cli_missing_data_dir_exits_2(tmp_path: Path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[data]\ndir = "{tmp_path / "nowhere"}"\n')
    result = runner.invoke(app, ["run", str(cfg), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert "data.dir" in _one_line_error(result)
    assert not (tmp_path / "run" / "summary.json").exists()


def test_cli_unknown_set_key_exits_2(tmp_path: Path):
    result = runner.invoke(app, ["run", str(ROOT / "configs/tiny/fedit.toml"), "--set", "train.epochz=1",
                                 "--out", str(tmp_path / "r")])
    assert result.exit_code == 2
    assert "--set train.epochz=1: unknown key" in _one_line_error(result)


def test_removed_key_names_its_replacement(tmp_path: Path):
    from fedblend.config import load_config
    from fedblend.errors import ConfigError

    cfg = tmp_path / "old.toml"
    cfg.write_text('[engine]\nkind = "flower"\n')
    with pytest.raises(ConfigError) as e:
        load_config(cfg)
    assert str(e.value).startswith(f"{cfg}: engine.kind: removed") and "fedblend deploy" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_config(None, ["engine.kind=inprocess"])
    assert str(e.value).startswith("--set engine.kind=inprocess: removed")
