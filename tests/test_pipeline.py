import os
import shutil
from pathlib import Path

import pytest

from tl_embed.cli import main, pipeline
from tl_embed.errors import TlEmbedError

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "examples" / "sign-digits"


@pytest.mark.parametrize("name", ["embed-folder", "classify-folder", "image-search", "quickstart"])
def test_shipped_pipelines_run_end_to_end(tmp_path, name, capsys):
    out = tmp_path / "out"
    argv = ["run", str(ROOT / "pipelines" / f"{name}.toml"), "--set", f"images={SAMPLE}",
            "--set", "weights=none", "--set", f"out={out}"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "0 up to date" in text and "40 embedded" in text
    expected = {"embed-folder": ["embeddings.npy", "embeddings.csv"],
                "classify-folder": ["classifier.tlh", "classifier.tlh.confusion.png"],
                "image-search": ["search.tli/index.bin", "sample-search.html", "duplicates.csv"],
                "quickstart": ["classifier.tlh.report.md", "sample-search.html"]}[name]
    for rel in expected:
        assert (out / rel).stat().st_size > 0, rel
    assert main(argv) == 0  # second run: nothing to do
    assert "0 steps ran" in capsys.readouterr().out


def test_touching_one_image_reembeds_only_it_and_retrains(tmp_path, capsys):
    images = shutil.copytree(SAMPLE, tmp_path / "images")
    out = tmp_path / "out"
    argv = ["run", str(ROOT / "pipelines" / "classify-folder.toml"), "--set", f"images={images}",
            "--set", "weights=none", "--set", f"out={out}", "--set", "model=mobilenet_v3_small"]
    assert main(argv) == 0
    capsys.readouterr()
    one = next((images / "2").iterdir())
    one.write_bytes(next((images / "3").iterdir()).read_bytes())  # new content
    future = one.stat().st_mtime + 5
    os.utime(one, (future, future))
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "1 embedded" in text and "39 unchanged" in text and "2 steps ran" in text
    assert main([*argv, "--dry-run"]) == 0
    assert capsys.readouterr().out.count("skipped: up to date") == 2
    assert main([*argv, "--set", "head=knn", "--dry-run"]) == 0  # options changed: train again
    plan = capsys.readouterr().out
    assert "embed: skipped: up to date" in plan and "train: would run" in plan


def write(tmp_path, text: str) -> Path:
    p = tmp_path / "p.toml"
    p.write_text(text)
    return p


GOOD_STEP = '[[step]]\nname = "e"\nrun = "embed"\nargs = ["{images}"]\n[step.options]\nout = "x.tle"\n'


def test_bad_pipelines_fail_before_any_work_with_file_and_line(tmp_path):
    cases = {
        '[vars]\nimages = "x"\n\n' + GOOD_STEP + '\n[[step]]\nname = "t"\nrun = "trian"\n':
            r"p.toml:11: step 't': unknown command 'trian'",
        '[vars]\nimages = "x"\n\n[[step]]\nname = "e"\nrun = "embed"\nargs = "{images}"\n':
            r"p.toml:7: step 'e': args must be a list, not str",
        '[vars]\nimages = "x"\n\n[[step]]\nrun = "embed"\n': r"p.toml:4: step 1 has no 'name'",
        '[vars]\nimages = "x"\n\n[[step]]\nname = "e"\nrun = "embed"\nargs = ["{images}"]\n':
            r"p.toml:4: step 'e': the following arguments are required: --out",
        '[vars]\nimages = "x"\n\n' + GOOD_STEP.replace('out = "x.tle"', 'out = "x.tle"\nbatch_size = "many"'):
            r"p.toml:4: step 'e': argument --batch-size: expected a whole number, not 'many'",
        '[vars]\nimages = ""\n\n' + GOOD_STEP: r"set --set images=\.\.\.",
        'stepz = 1\n': r"p.toml:1: unknown top-level key 'stepz'",
    }
    for text, message in cases.items():
        with pytest.raises(TlEmbedError, match=message):
            pipeline.load(write(tmp_path, text))
    with pytest.raises(TlEmbedError, match="has no variable 'imagez'"):
        pipeline.load(write(tmp_path, '[vars]\nimages = "x"\n' + GOOD_STEP), ["imagez=y"])
    assert not (tmp_path / "x.tle").exists()
