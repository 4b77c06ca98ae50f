"""Bad option values and unwritable outputs: one line, exit status 2, never a traceback, nothing written."""

import subprocess
import sys

import pytest

from tl_embed.cli import main
from tl_embed.cli.embedding import export_paths


def exit_code(argv: list[str]) -> int:
    """main()'s status, whether the error came from argparse (SystemExit) or from the command."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


@pytest.mark.parametrize(("argv", "needle"), [
    (["embed", "{images}", "--out", "{tmp}/s.tle", "--workers", "-1"], "--workers: must be at least 1"),
    (["embed", "{images}", "--out", "{tmp}/s.tle", "--workers", "0"], "--workers: must be at least 1"),
    (["embed", "{images}", "--out", "{tmp}/s.tle", "--batch-size", "0"], "--batch-size: must be at least 1"),
    (["embed", "{images}", "--out", "{tmp}/s.tle", "--layer", "no_such_layer"], "--layer no_such_layer only applies"),
    (["embed", "{images}", "--out", "{tmp}/s.tle", "--preprocess", "resnet50"], "--preprocess resnet50 only applies"),
    (["embed", "{images}", "--out", "{tmp}/missing/s.tle"], "folder {tmp}/missing does not exist"),
    (["predict", "m.tlh", "x.jpg", "--min-confidence", "2"], "--min-confidence: must be between 0 and 1"),
    (["predict", "m.tlh", "x.jpg", "--min-confidence", "-1"], "--min-confidence: must be between 0 and 1"),
    (["predict", "m.tlh", "x.jpg", "--top-k", "0"], "--top-k: must be at least 1"),
    (["train", "{tmp}/s.tle", "--out", "{tmp}/missing/m.tlh"], "folder {tmp}/missing does not exist"),
    (["export", "{tmp}/s.tle", "--out", "{tmp}/missing/e"], "folder {tmp}/missing does not exist"),
])
def test_bad_values_are_one_line(tmp_path, image_folder, capsys, argv, needle):
    argv = [a.format(images=image_folder, tmp=tmp_path) for a in argv]
    assert exit_code(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle.format(tmp=tmp_path) in err[0], err
    assert not (tmp_path / "s.tle").exists() and not (tmp_path / "missing").exists()


def test_bad_value_in_a_subprocess_has_no_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "tl_embed.cli", "embed", str(tmp_path), "--out",
                        str(tmp_path / "s.tle"), "--workers", "-1"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [
        "tl-embed embed: error: argument --workers: must be at least 1, not -1 (see `tl-embed embed --help`)"]


@pytest.mark.parametrize(("out", "npy", "csv"), [
    ("runs/emb.v2", "runs/emb.v2.npy", "runs/emb.v2.csv"),
    ("emb", "emb.npy", "emb.csv"),
    ("emb.npy", "emb.npy", "emb.csv"),
    ("x/emb.csv", "x/emb.npy", "x/emb.csv"),
])
def test_export_keeps_a_dotted_prefix(out, npy, csv):
    assert tuple(map(str, export_paths(out))) == (npy, csv)


def test_counted_nouns_agree_with_their_number():
    from tl_embed.wording import count

    assert [count(n, "query") for n in (0, 1, 2)] == ["0 queries", "1 query", "2 queries"]
    assert count(1, "group") == "1 group" and count(3, "image") == "3 images"


def test_help_shows_only_defaults_worth_showing(capsys):
    """No '(default: None)' on a required --out, no second default where the help states one."""
    from tl_embed.cli.main import build_parser

    commands = build_parser().commands
    for name, parser in commands.items():
        text = parser.format_help()
        assert "(default: None)" not in text and "(default: False)" not in text, name
        for action in parser._actions:
            if action.help and "default" in action.help:
                assert parser._get_formatter()._get_help_string(action) == action.help, (name, action.dest)
    model = next(a for a in commands["embed"]._actions if a.dest == "model")
    assert "(default: %(default)s)" in commands["embed"]._get_formatter()._get_help_string(model)  # real ones stay
