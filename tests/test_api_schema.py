"""The OpenAPI schema is exact: a bounded schemathesis run (all checks) against a real server.

schemathesis generates requests from the served schema, valid and invalid, and checks each answer
against it: status codes and bodies declared, schema-valid requests accepted, schema-violating ones
refused, auth not ignored. Its settings and the one declared exception (a random body is
schema-valid but no image) are in tools/schemathesis.toml.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="needs the [serve] extra")
pytest.importorskip("schemathesis", reason="needs the [dev] extra")

from tests.serve_process import ServerProcess

TOKEN = "schema-test-token-0123456789abcdef"

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "tools" / "schemathesis.toml"


def schemathesis_cli() -> str:
    found = shutil.which("st", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.fail("schemathesis is installed but its `st` command is not beside this Python")
    return found


def test_every_operation_answers_as_its_schema_says_under_all_checks(tmp_path):
    (tmp_path / "token").write_text(TOKEN)
    with ServerProcess(tmp_path, "--set", f"token_file={tmp_path / 'token'}") as server:
        server.wait_ready()
        run = subprocess.run(
            [schemathesis_cli(), "--config-file", str(CONFIG), "run", server.url + "/openapi.json",
             "--checks", "all", "-H", f"Authorization: Bearer {TOKEN}", "--max-examples", "150",
             "--seed", "18", "--suppress-health-check", "all", "--no-color",
             "--report", "ndjson", "--report-ndjson-path", str(tmp_path / "events.ndjson")],
            capture_output=True, text=True, timeout=300, cwd=ROOT,
            env={**os.environ, "SCHEMATHESIS_HOOKS": "tools.schemathesis_hooks", "PYTHONPATH": str(ROOT)},
        )  # fmt: skip
        server.stop()
    report = run.stdout + run.stderr
    assert run.returncode == 0, report[-4000:]
    generated = re.search(r"(\d+) generated, (\d+) passed", report)
    assert generated, report[-2000:]
    assert int(generated[1]) >= 150 and generated[1] == generated[2], report[-2000:]
    assert "Operations:       7 selected / 7 total" in report and "Tested: 7" in report
    events = (tmp_path / "events.ndjson").read_text()
    ran = set(re.findall(r'"name":\s*"([a-z_]+)"', events))
    assert {"schema_valid_queries_are_not_refused_for_their_form", "positive_data_acceptance",
            "negative_data_rejection", "response_schema_conformance", "status_code_conformance",
            "ignored_auth"} <= ran  # fmt: skip
