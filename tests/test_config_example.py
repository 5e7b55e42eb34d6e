"""The shipped example config is valid, and `config check`'s output is itself a valid config."""

import tomllib
from pathlib import Path

from yuubin.config import describe, from_dict

EXAMPLE = Path(__file__).resolve().parent.parent / "yuubin.example.toml"


def test_example_config_is_valid_and_complete():
    raw = tomllib.loads(EXAMPLE.read_text(encoding="utf-8"))
    cfg = from_dict(raw)
    assert cfg.hostname == "mx.example.jp"
    assert [lc.kind for lc in cfg.listeners] == ["mx", "submission", "submissions", "imaps"]
    # Every key that `config check` prints is documented in the example (nothing hidden).
    effective = tomllib.loads(describe(cfg))
    for section, value in effective.items():
        if isinstance(value, dict):
            missing = set(value) - set(raw.get(section, {}))
            assert not missing, f"[{section}] keys missing from yuubin.example.toml: {sorted(missing)}"


def test_describe_round_trips():
    cfg = from_dict(tomllib.loads(EXAMPLE.read_text(encoding="utf-8")))
    again = from_dict(tomllib.loads(describe(cfg)))
    assert again == cfg
