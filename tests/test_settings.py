"""Settings precedence: defaults < config file < STEPSERVE_* environment < flags."""

import pytest

from stepserve.cli import build_parser
from stepserve.commands.serve import settings_from_args
from stepserve.server.settings import Settings


def parse(*argv):
    return settings_from_args(build_parser().parse_args(["serve", *argv]))


def test_precedence(tmp_path, monkeypatch):
    cfg = tmp_path / "stepserve.toml"
    cfg.write_text('max_batch_size = 16\nport = 9000\nbatching = "request"\nmax_queue = 7\n')
    assert parse().max_batch_size == 32  # default
    s = parse("--config", str(cfg))
    assert (s.max_batch_size, s.port, s.batching) == (16, 9000, "request")
    monkeypatch.setenv("STEPSERVE_PORT", "9100")
    monkeypatch.setenv("STEPSERVE_MAX_QUEUE", "9")
    s = parse("--config", str(cfg), "--max-queue", "11", "--no-compile")
    assert (s.port, s.max_queue, s.max_batch_size, s.compile) == (9100, 11, 16, False)
    monkeypatch.setenv("STEPSERVE_CONFIG", str(cfg))
    assert parse().batching == "request"


def test_every_setting_has_a_flag():
    help_text = build_parser()._subparsers._group_actions[0].choices["serve"].format_help()
    for name in Settings.model_fields:
        if name != "models":  # a list of tables: config file only
            assert f"--{name.replace('_', '-')}" in help_text


def test_json_config_and_errors(tmp_path):
    cfg = tmp_path / "s.json"
    cfg.write_text('{"warmup_batch_sizes": [1, 4], "threads": 2}')
    s = parse("--config", str(cfg))
    assert s.warmup_batch_sizes == [1, 4] and s.threads == 2
    assert parse("--warmup-batch-sizes", "2", "3").warmup_batch_sizes == [2, 3]
    with pytest.raises(FileNotFoundError):
        parse("--config", str(tmp_path / "missing.toml"))
    bad = tmp_path / "bad.toml"
    bad.write_text("max_batch_size = 0\n")
    with pytest.raises(ValueError, match="max_batch_size"):
        parse("--config", str(bad))
    typo = tmp_path / "typo.toml"
    typo.write_text("max_batch = 4\n")
    with pytest.raises(ValueError, match="max_batch"):
        parse("--config", str(typo))


def test_serve_rejects_bad_flag_values():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--batching", "sometimes"])
