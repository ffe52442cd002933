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
