"""The command-line contract (docs/cli.md): shared flags come from the one Settings
object, with one name, choice list, default and help text on every command."""

import numpy as np
import pytest
from PIL import Image

from stepserve.cli import build_parser, main
from stepserve.server.settings import ModelEntry, Settings

SHARED = ["--model", "--engine", "--precision", "--device", "--batching", "--max-batch-size",
          "--cache", "--quantization", "--build-dir", "--threads", "--max-steps", "--config"]


def actions(command: str) -> dict:
    sub = build_parser()._subparsers._group_actions[0].choices[command]
    return {opt: a for a in sub._actions for opt in a.option_strings}


@pytest.mark.parametrize("flag", SHARED)
def test_shared_flags_are_one_flag_on_every_command(flag):
    seen = {cmd: actions(cmd)[flag] for cmd in ("serve", "generate", "worker", "api", "eval",
                                                  "build")}
    first = seen["serve"]
    for cmd, action in seen.items():
        assert action.dest == first.dest, cmd
        assert action.help == first.help, cmd
        assert action.choices == first.choices, cmd
        assert action.default is None, cmd  # the default lives in Settings, once


def test_redis_url_on_the_roles_that_use_it():
    for cmd in ("serve", "worker", "api"):
        assert "--redis-url" in actions(cmd)


def test_help_shows_real_defaults_once():
    for cmd in ("serve", "generate", "worker", "eval", "build"):
        text = build_parser()._subparsers._group_actions[0].choices[cmd].format_help()
        assert "PydanticUndefined" not in text, cmd
        assert text.count("(default") >= 5, cmd
        assert "(default: the model's) (default" not in text
    assert "(default: 32)" in actions("generate")["--max-batch-size"].help


def test_choices_come_from_the_registries():
    from stepserve.engines.registry import available
    from stepserve.models.caches.config import policy_names

    assert actions("generate")["--engine"].choices == available()
    assert actions("generate")["--cache"].choices == list(policy_names())
    with pytest.raises(ValueError, match="engine must be one of"):
        Settings(engine="tensorflow")
    with pytest.raises(ValueError, match="cache must be one of"):
        Settings(cache="fastcache")


def test_model_entries_reject_keys_that_only_the_top_level_has():
    with pytest.raises(ValueError, match="model_alias"):
        ModelEntry(path="builtin", model_alias="x")
    with pytest.raises(ValueError, match="models"):
        ModelEntry(path="builtin", models=[])


def test_generate_steps_obey_max_steps(tmp_path, capsys):
    assert main(["generate", "x", "--steps", "65", "--out", str(tmp_path)]) == 2
    assert "max_steps (64)" in capsys.readouterr().err
    assert main(["generate", "x", "--steps", "3", "--max-steps", "2",
                 "--out", str(tmp_path)]) == 2


def test_generate_serves_a_diffusers_folder_with_a_cache(tmp_path, capsys):
    pytest.importorskip("diffusers")
    from stepserve.models.families.tiny import tiny_sd

    folder = tiny_sd(tmp_path / "tiny-sd")
    out = tmp_path / "out"
    argv = ["generate", "a red circle", "a blue square", "--model", str(folder),
            "--cache", "ab-cache", "--steps", "6", "--guidance", "2", "--out", str(out)]
    assert main(argv) == 0, capsys.readouterr().err
    assert "cache=ab-cache" in capsys.readouterr().out
    files = sorted(p.name for p in out.iterdir())
    assert files == ["0000.png", "0001.png"]
    cached = np.asarray(Image.open(out / "0000.png")).astype(float)
    assert cached.shape == (32, 32, 3)
    assert main([*argv[:-2], "--cache", "none", "--out", str(tmp_path / "plain")]) == 0
    plain = np.asarray(Image.open(tmp_path / "plain" / "0000.png")).astype(float)
    assert 0 < np.abs(cached - plain).max() and np.linalg.norm(cached - plain) < (
        0.2 * np.linalg.norm(plain))  # the cache skipped steps, and stayed close
    assert main([*argv, "--cache", "first-blocks"]) == 2  # a DiT-block cache on a U-Net
    assert "needs an engine that runs the DiT blocks" in capsys.readouterr().err
