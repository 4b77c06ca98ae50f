"""The API description is what the server does: a bounded schemathesis run, every check, on the real server.

Requests are generated from ``/openapi.json`` (a fixed seed, tens of examples per operation, a time limit),
both those the description allows and those it rules out, and every answer is checked against it: no
server error, documented status codes and content types, the response shapes, that requests valid by the
description are accepted and invalid ones refused.  ``schemathesis.toml`` holds the two exceptions, each
with its reason: the statuses an upload that is not an image may get, and the form-taking operations,
where a value the description rules out can arrive as valid text.  Every check is on by default; naming
them with ``--checks`` on the command line would override those per-operation settings.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from serve_data import build_audited
from test_serve_cli import free_port, start, stop, wait_ready

CONFIG = Path(__file__).with_name("schemathesis.toml")


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model):
    return build_audited(tmp_path_factory.mktemp("schema"), tiny_model)  # with an audit: its routes too


@pytest.mark.parametrize("token", [None, "t0k"])
def test_every_answer_matches_the_api_description(served, token):
    port = free_port()
    proc = start(str(served.index), "--head", str(served.head), "--audit", str(served.audit), "--port", str(port),
                 **({"TL_EMBED_TOKEN": token} if token else {}))
    try:
        wait_ready(proc, f"http://127.0.0.1:{port}", token)
        auth = ["-H", f"Authorization: Bearer {token}"] if token else []
        r = subprocess.run([str(Path(sys.executable).with_name("st")), "--config-file", str(CONFIG), "run",
                            f"http://127.0.0.1:{port}/openapi.json", "--mode", "all",
                            "--max-examples", "25", "--seed", "1", "--max-time", "30", "--no-color", *auth],
                           capture_output=True, text=True, timeout=240)
    finally:
        stop(proc)
    assert r.returncode == 0, r.stdout[-6000:]
    assert " passed" in r.stdout and "failed" not in r.stdout.split("SUMMARY")[-1]
