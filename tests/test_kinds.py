"""The wrong kind of file is refused by name with what to run instead, and nothing is written into it."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_folder

from tl_embed.cli import main
from tl_embed.kinds import EXPORT, HEAD, INDEX, STORE, kind_of


def tree_digest(path: Path) -> str:
    """Names and contents of every file under ``path`` (SQLite's -wal/-shm side files aside)."""
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file() and not p.name.endswith(("-wal", "-shm", ".lock"))):
        h.update(str(f.relative_to(path)).encode() + f.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("kinds")
    images = make_folder(root / "images", per_class=5)
    store, head, index, export = root / "pets.tle", root / "pets.tlh", root / "pets.tli", root / "pets-export"
    assert main(["embed", str(images), "--out", str(store), "--model", tiny_model, "--layer", "features", "-q"]) == 0
    assert main(["train", str(store), "--out", str(head), "--head", "logreg"]) == 0
    assert main(["index", str(store), "--out", str(index)]) == 0
    return {"root": root, "images": images, STORE: store, HEAD: head, INDEX: index, EXPORT: export}


def test_each_kind_is_told_by_content(files, tmp_path):
    for kind in (STORE, HEAD, INDEX):
        assert kind_of(files[kind]) == kind
        renamed = tmp_path / f"renamed-{kind}"  # by content, not by suffix
        os.symlink(files[kind], renamed)
        assert kind_of(renamed) == kind
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "export.json").write_text("{}")
    assert kind_of(tmp_path / "export") == EXPORT
    assert kind_of(files["images"]) is None and kind_of(tmp_path / "missing") is None
    assert kind_of(next(files["images"].rglob("*.jpg"))) is None


@pytest.mark.parametrize(("argv", "expected"), [
    (["search", "pets.tle", "images"],
     "pets.tle is an embedding store, not a search index: build one with `tl-embed index pets.tle --out pets.tli`"),
    (["search", "pets.tlh", "images"], "pets.tlh is a model file (a trained head), not a search index"),
    (["serve", "pets.tlh"], "pets.tlh is a model file (a trained head), not a search index"),
    (["predict", "pets.tle", "images"],
     "pets.tle is an embedding store, not a model file or an exported model folder: train one with "
     "`tl-embed train pets.tle --out pets.tlh`"),
    (["predict", "pets.tli", "images"], "pets.tli is a search index, not a model file"),
    (["serve", "pets.tli", "--head", "pets.tle"], "pets.tle is an embedding store, not a model file"),
    (["evaluate", "pets.tlh", "pets.tli"], "pets.tli is a search index, not an embedding store"),
    (["train", "pets.tli", "--out", "new.tlh"], "pets.tli is a search index, not an embedding store"),
    (["info", "pets.tlh"], "pets.tlh is a model file (a trained head), not an embedding store"),
    (["index", "pets.tle", "--out", "pets.tle"],
     "--out pets.tle is an embedding store; writing a search index there would destroy it: choose another "
     "--out (e.g. pets.tli)"),
    (["index", "pets.tle", "--out", "pets.tlh"], "--out pets.tlh is a model file (a trained head); writing a search"),
    (["embed", "images", "--out", "pets.tlh"], "--out pets.tlh is a model file (a trained head); writing an "
                                               "embedding store there"),
    (["embed", "images", "--out", "pets.tli"], "--out pets.tli is a search index; writing an embedding store"),
    (["train", "pets.tle", "--out", "pets.tle"], "--out pets.tle is an embedding store; writing a model file"),
    (["train", "pets.tle", "--out", "pets.tli"], "--out pets.tli is a search index; writing a model file"),
    (["export-model", "pets.tlh", "--format", "keras", "--out", "pets.tle"],
     "--out pets.tle is an embedding store; writing an exported model folder there"),
])
def test_wrong_kind_is_one_line_naming_it_and_writes_nothing(files, capsys, monkeypatch, argv, expected):
    monkeypatch.chdir(files["root"])  # the names a user types
    before = {k: tree_digest(files[k]) if files[k].is_dir() else files[k].read_bytes() for k in (STORE, INDEX)}
    head_bytes = files[HEAD].read_bytes()
    assert main(argv) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("tl-embed: error: " + expected), err
    assert {k: tree_digest(files[k]) for k in (STORE, INDEX)} == before
    assert files[HEAD].read_bytes() == head_bytes
    assert not (files[STORE] / "index.bin").exists() and not (files["root"] / "pets-export").exists()


def test_the_library_refuses_too(files):
    """Python callers get the same refusals: the store's .lock no longer passes for an index's."""
    from tl_embed.errors import TlEmbedError
    from tl_embed.heads.head import Head
    from tl_embed.search.index import Index

    with pytest.raises(TlEmbedError, match="is an embedding store; writing a search index"):
        Index.build(str(files[STORE]), str(files[STORE]))
    assert not (files[STORE] / "index.bin").exists()
    with pytest.raises(TlEmbedError, match="is an embedding store; writing a model file"):
        Head.load(files[HEAD]).save(files[STORE])
    photo = next(files["images"].rglob("*.jpg"))
    data = photo.read_bytes()
    with pytest.raises(TlEmbedError, match="not a tl_embed model file"):
        Head.load(files[HEAD]).save(photo)
    assert photo.read_bytes() == data


def test_a_wrong_out_is_refused_before_tensorflow_is_imported(files):
    code = ("import sys; from tl_embed.cli import main; s = main(['embed', 'images', '--out', 'pets.tlh']); "
            "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules; sys.exit(s)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=files["root"], timeout=60)
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1 and "model file" in r.stderr, r.stderr
