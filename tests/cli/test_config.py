import pytest
from pydantic import Field

from uniter3m.config import StrictModel, apply_overrides, load_config
from uniter3m.errors import ConfigError


class Optim(StrictModel):
    lr: float = Field(1e-4, gt=0)
    warmup: int = 0


class Cfg(StrictModel):
    name: str
    optim: Optim = Optim()
    tasks: list[str] = []


def test_every_bad_key_is_listed_at_once(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"name": "x", "optim": {"lr": -1, "warmpu": 3}, "tsks": []}')
    with pytest.raises(ConfigError) as info:
        load_config(Cfg, path)
    msg = str(info.value)
    assert "3 bad key(s)" in msg
    assert "optim.lr" in msg and "optim.warmpu: unknown key" in msg and "tsks: unknown key" in msg
    assert str(path) in msg


def test_overrides_parse_json_and_nest():
    cfg = load_config(Cfg, {"name": "x", "tasks": ["a", "b"]}, ["optim.lr=5e-5", "tasks.1=c", "name=run 2"])
    assert cfg.optim.lr == 5e-5 and cfg.tasks == ["a", "c"] and cfg.name == "run 2"


def test_bad_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, ["novalue"])
    with pytest.raises(ConfigError, match="not an index"):
        apply_overrides({"t": [1]}, ["t.5=2"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Cfg, tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("{oops")
    with pytest.raises(ConfigError, match="invalid JSON"):
        load_config(Cfg, tmp_path / "bad.json")
