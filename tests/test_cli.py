"""The edgebc command: help texts with defaults, one-line errors, tracebacks only with --verbose."""

import json
import subprocess
import sys

import pytest

from edgebc.cli import build_parser, main


def run(*args):
    return subprocess.run(
        [sys.executable, "-m", "edgebc", *args], capture_output=True, text=True, timeout=120
    )


def test_info_json_reports_versions_and_providers():
    result = run("info", "--json")
    assert result.returncode == 0, result.stderr
    facts = json.loads(result.stdout)
    assert facts["packages"]["numpy"] and "CPUExecutionProvider" in facts["onnxruntime_providers"]
    # which path makes the downscales, as edgebc.area judged it (the kernel is built here)
    assert facts["area_kernel"].startswith("loaded from area_kernel")
    assert facts["area_kernel"].endswith("equal to the numpy path")


@pytest.mark.parametrize("command", [["info"], ["synth"], ["data", "audit"], ["data", "split"]])
def test_help_shows_every_default(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([*command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "usage: edgebc" in text
    if command != ["info"]:
        assert "(default:" in text


def test_errors_are_one_line_and_verbose_shows_the_traceback(tmp_path):
    quiet = run("data", "audit", str(tmp_path / "missing"))
    assert quiet.returncode == 1
    assert "Traceback" not in quiet.stderr
    assert "edgebc: error:" in quiet.stderr and "no such file or folder" in quiet.stderr
    loud = run("--verbose", "data", "audit", str(tmp_path / "missing"))
    assert loud.returncode == 1 and "Traceback" in loud.stderr


def test_synth_then_audit_then_split_end_to_end(tmp_path, capsys):
    assert main(["synth", str(tmp_path / "ds"), "--n-per-class", "8", "--size", "64"]) == 0
    assert (
        main(
            [
                "data",
                "audit",
                str(tmp_path / "ds" / "manifest.csv"),
                "--out",
                str(tmp_path / "audit"),
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "data",
                "split",
                str(tmp_path / "audit" / "manifest.clean.csv"),
                "--out",
                str(tmp_path / "split.csv"),
                "--folds",
                "3",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "24 images: 0 unreadable" in out and "fold2" in out
    assert (tmp_path / "split.csv").read_text().count("\n") == 25


def test_usage_errors_exit_2():
    assert run("synth", "--n-per-class", "x", "out").returncode == 2


def every_parser(parser=None, path=()):
    """(command words, parser) for `edgebc` and each of its subcommands, nested ones too."""
    import argparse

    parser = parser or build_parser()
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from every_parser(sub, (*path, name))


def test_every_option_shows_one_default_the_true_one():
    """argparse's "(default: None)" after a help text that names the settings file's default was
    two defaults, one of them false; an empty list or None is no default to show."""
    import re

    checked = 0
    for words, parser in every_parser():
        text = re.sub(r"\s+", " ", parser.format_help())
        for entry in re.split(r" (?=-{1,2}[a-z])", text):
            assert entry.lower().count("default") <= 1, (words, entry)
            assert "(default: None)" not in entry and "(default: [])" not in entry, (words, entry)
            checked += 1
    assert checked > 150  # every subcommand's options were looked at
    synth = re.sub(r"\s+", " ", dict(every_parser())[("synth",)].format_help())
    assert "the same seed writes the same files (default: 0)" in synth  # a zero is a default


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["serv"], "invalid choice: 'serv' (choose from 'info',"),
        (["serv"], "did you mean 'serve'? see edgebc --help"),
        (["data", "audt"], "did you mean 'audit'? see edgebc data --help"),
        (["frobnicate"], "'audit'); see edgebc --help"),
    ],
)
def test_a_mistyped_command_gets_a_suggestion(argv, words, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(argv)
    assert exit_info.value.code == 2 and words in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["train", "--set", "epochs=3"],
         "--set epochs=3: TrainConfig has no setting 'epochs'. Did you mean 'optim.epochs'?"),
        (["train", "--set", "optim.epoch=3"], "Did you mean 'optim.epochs'? Valid keys under optim: optim.epochs,"),
        (["train", "--set", "optim.epochs.x=3"], "'optim.epochs' is a single value, not a group"),
        (["train", "--set", "optim.epochs=abc"], "--set: TrainConfig.optim: OptimConfig.epochs: expected an integer"),
        (["serve", "--check", "--set", "toke_file=x"], "has no setting 'toke_file'. Did you mean 'token_file'?"),
    ],
)  # fmt: skip
def test_set_mistakes_blame_the_flag_and_find_the_dotted_key(argv, words, capsys):
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert words in err and "defaults:" not in err


def test_a_mistake_in_the_file_still_names_the_file(tmp_path, capsys):
    config = tmp_path / "job.yaml"
    config.write_text("optim:\n  epochs: many\n")
    assert main(["train", "--config", str(config), "--set", "optim.lr=0.1"]) == 1
    assert (
        f"{config}: TrainConfig.optim: OptimConfig.epochs: expected an integer"
        in capsys.readouterr().err
    )


def test_an_unquoted_off_is_the_word_off_not_yaml_false():
    """`--set shift=off` (and `shift: off` in a file): YAML 1.1 reads off as false."""
    import yaml

    from edgebc.classifier_settings import ClassifierSettings
    from edgebc.config import from_mapping
    from edgebc.errors import ConfigError

    assert from_mapping(ClassifierSettings, yaml.safe_load("shift: off")).shift == "off"
    with pytest.raises(ConfigError, match="expected one of"):
        from_mapping(ClassifierSettings, yaml.safe_load("shift: true"))


@pytest.mark.parametrize(
    ("extra", "said"),
    [
        (["--plan-pace", "30"], "give --plan too"),
        (["--plan"], "--plan needs --check"),
        (["--plan", "--check", "x.csv", "--plan-pace", "-1"], "--plan-pace is a source's frames"),
        (["--plan", "--check", "x.csv", "--plan-pace", "inf"], "--plan-pace is a source's frames"),
    ],
)
def test_export_refuses_a_plan_it_cannot_make_before_exporting_anything(
    tmp_path, capsys, extra, said
):
    pytest.importorskip("torch", reason="edgebc export needs the [export] extra")
    out = tmp_path / "export"
    assert main(["export", str(tmp_path / "missing.pt"), "--out", str(out), *extra]) == 1
    assert said in capsys.readouterr().err  # not the missing checkpoint: nothing was begun
    assert not out.exists()
