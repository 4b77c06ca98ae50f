import json
import subprocess
import sys

from tl_embed.cli import main
from tl_embed.embedding.backbones import BACKBONES


def test_models_lists_every_backbone(capsys):
    assert main(["models", "--format", "json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert {m["name"] for m in listed} == set(BACKBONES)
    assert next(m for m in listed if m["name"] == "efficientnet_b3")["input_size"] == 300


def test_models_does_not_import_tensorflow():
    code = "import sys; from tl_embed.cli import main; main(['models']); print('tensorflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("False")


def test_embed_info_export(tmp_path, image_folder, tiny_model, capsys):
    out = tmp_path / "s.tle"
    assert main(["embed", str(image_folder), "--out", str(out), "--model", tiny_model,
                 "--layer", "features", "-q"]) == 0
    assert "18 embedded" in capsys.readouterr().out
    (image_folder / "red" / "bad.png").write_bytes(b"\x89PNG broken")
    assert main(["embed", str(image_folder), "--out", str(out), "--model", tiny_model,
                 "--layer", "features", "-q"]) == 0
    assert main(["info", str(out)]) == 0
    info = capsys.readouterr().out
    assert "tiny.keras" in info and "labels     blue 6, green 6, red 6" in info
    assert "red/bad.png: not a recognised image format" in info
    assert main(["export", str(out), "--out", str(tmp_path / "e")]) == 0
    assert (tmp_path / "e.npy").exists() and (tmp_path / "e.csv").exists()


def test_user_errors_are_one_line_not_a_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "tl_embed.cli", "info", str(tmp_path / "nope.tle")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("tl-embed: error:")
    r = subprocess.run([sys.executable, "-m", "tl_embed.cli", "embed", str(tmp_path), "--out",
                        str(tmp_path / "s.tle"), "--model", "no_such_net"], capture_output=True, text=True)
    assert r.returncode == 2 and "unknown model 'no_such_net'" in r.stderr and "Traceback" not in r.stderr


def test_embed_refuses_to_empty_a_store_without_prune(tmp_path, image_folder, tiny_model, capsys):
    out = tmp_path / "s.tle"
    args = ["embed", str(image_folder), "--out", str(out), "--model", tiny_model, "--layer", "features", "-q"]
    assert main(args) == 0
    for f in image_folder.rglob("*.jpg"):
        f.unlink()
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith(f"tl-embed: error: this run would remove 18 of the 18 embeddings in {out}")
    assert err[0].endswith("run again with --prune to remove them")
    assert main([*args, "--prune"]) == 0
    assert "18 removed" in capsys.readouterr().out
    assert main(["info", str(out)]) == 0 and "embedded   0" in capsys.readouterr().out
