"""``tl-embed serve`` as a user runs it: the real command in a subprocess, its warnings and one-line errors."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from conftest import ROOT
from serve_data import build

from tl_embed.cli import main


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model):
    return build(tmp_path_factory.mktemp("cli"), tiny_model)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, token: str | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url, headers={"authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def start(*args: str, **env_vars: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **env_vars}
    return subprocess.Popen([sys.executable, "-m", "tl_embed.cli", "serve", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_ready(proc: subprocess.Popen, url: str, token: str | None = None) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1]
        try:
            if get(url + "/healthz", token)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise AssertionError("tl-embed serve did not answer /healthz within 120 s")


def stop(proc: subprocess.Popen) -> str:
    proc.terminate()
    try:
        return proc.communicate(timeout=30)[1]
    finally:
        proc.kill()


def test_serves_on_loopback_quietly(served):
    port = free_port()
    proc = start(str(served.index), "--head", str(served.head), "--port", str(port))
    try:
        wait_ready(proc, f"http://127.0.0.1:{port}")
        status, info = get(f"http://127.0.0.1:{port}/info")
        assert status == 200 and info["store"]["images"] == 12 and info["heads"][0]["name"] == "m"
    finally:
        err = stop(proc)
    assert "warning" not in err and f"at http://127.0.0.1:{port}/" in err


def test_another_host_warns_and_the_token_guards(served):
    port = free_port()
    proc = start(str(served.index), "--host", "0.0.0.0", "--port", str(port), TL_EMBED_TOKEN="t0k")  # not in ps
    try:
        wait_ready(proc, f"http://127.0.0.1:{port}", token="t0k")
        assert get(f"http://127.0.0.1:{port}/info")[0] == 401
        assert get(f"http://127.0.0.1:{port}/info", token="t0k")[0] == 200
    finally:
        err = stop(proc)
    assert "warning: listening on 0.0.0.0" in err and "no --token" not in err


@pytest.mark.parametrize("args, words", [
    (["{missing}"], "is not a tl_embed index"),
    (["{index}", "--head", "{missing}"], "does not exist"),
    (["{index}", "--port", "70000"], "between 0 and 65535"),
    (["{index}", "--host", "no-such-host.invalid"], "--host no-such-host.invalid"),
    (["{index}", "--min-confidence", "2"], "between 0 and 1"),
])
def test_user_errors_are_one_line_exit_2(served, tmp_path, capsys, args, words):
    fill = {"index": str(served.index), "missing": str(tmp_path / "nothing.tli")}
    with pytest.raises(SystemExit) if "--min-confidence" in args else contextlib.nullcontext():
        rc = main(["serve", *[a.format(**fill) for a in args]])
        assert rc == 2
    err = capsys.readouterr().err.strip()
    assert words in err and len(err.splitlines()) == 1


def test_a_port_in_use_is_one_line(served, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        assert main(["serve", str(served.index), "--port", str(s.getsockname()[1])]) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot listen on 127.0.0.1" in err and len(err.splitlines()) == 1


def test_a_huge_header_is_431_at_once_and_delays_no_one(served, tmp_path):
    """uvicorn reads headers unbounded: the server refuses a head over 64 KB before reading further."""
    import io

    import httpx
    import numpy as np
    from PIL import Image

    port = free_port()
    proc = start(str(served.index), "--port", str(port), TL_EMBED_TOKEN="t0k")
    try:
        wait_ready(proc, f"http://127.0.0.1:{port}", "t0k")
        slow = socket.create_connection(("127.0.0.1", port))  # a head that is not finished yet
        slow.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 60_000)
        t0 = time.monotonic()
        assert get(f"http://127.0.0.1:{port}/healthz", "t0k")[0] == 200
        assert time.monotonic() - t0 < 2.0
        big = socket.create_connection(("127.0.0.1", port))
        t0 = time.monotonic()
        with contextlib.suppress(OSError):  # the server closes while the rest is still being sent
            big.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 1_000_000 + b"\r\n\r\n")
        answer = big.recv(4096)
        assert answer.startswith(b"HTTP/1.1 431 ") and b'"error"' in answer, answer[:200]
        assert time.monotonic() - t0 < 2.0
        slow.close()
        big.close()
        # a body above the head's limit is not a head: a 200 KB upload is served as before
        pixels = np.random.default_rng(0).integers(0, 255, (420, 420, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, "JPEG", quality=95)
        assert len(buf.getvalue()) > 100_000
        r = httpx.post(f"http://127.0.0.1:{port}/search", files={"image": ("q.jpg", buf.getvalue(), "image/jpeg")},
                       headers={"authorization": "Bearer t0k"}, timeout=60)
        assert r.status_code == 200 and len(r.json()["neighbours"]) > 0
    finally:
        err = stop(proc)
    assert "Traceback" not in err


def test_malformed_uploads_do_not_flood_the_log(served):
    """Each malformed multipart part header made python-multipart log a line: 40 of them now make one."""
    import httpx

    port = free_port()
    proc = start(str(served.index), "--port", str(port))
    try:
        wait_ready(proc, f"http://127.0.0.1:{port}")
        body = b'--XX\r\nContent-Dispo\x01sition: form-data; name="image"\r\n\r\nabc\r\n--XX--\r\n'
        for _ in range(40):
            r = httpx.post(f"http://127.0.0.1:{port}/search", content=body,
                           headers={"content-type": "multipart/form-data; boundary=XX"}, timeout=30)
            assert r.status_code == 400 and "error" in r.json()
    finally:
        err = stop(proc)
    noise = [line for line in err.splitlines() if "character 1 in header" in line]  # either package's wording
    assert len(noise) == 1, err


def test_folded_warnings_say_how_many_were_folded():
    import logging

    from tl_embed.serve.logs import FoldRepeats

    fold = FoldRepeats(interval=0.2)
    records = [logging.LogRecord("m", logging.WARNING, __file__, 1, "bad header %d", (i,), None) for i in range(5)]
    assert [fold.filter(r) for r in records] == [True, False, False, False, False]
    time.sleep(0.25)
    last = logging.LogRecord("m", logging.WARNING, __file__, 1, "bad header %d", (5,), None)
    assert fold.filter(last) and last.getMessage() == "bad header 5 (and 4 more since the last one)"
