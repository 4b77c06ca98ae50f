"""The scan on odd folders: links (broken, looping, to a parent), pipes, bad names, unreadable folders."""

import errno
import os

import pytest
from conftest import COLORS, make_folder, make_image

from tl_embed.embedding.scan import printable, scan
from tl_embed.errors import TlEmbedError


def rels(found) -> list[str]:
    return [f.rel for f in found.files]


def test_folder_link_to_parent_is_scanned_once(tmp_path):
    root = make_folder(tmp_path / "images", per_class=2)
    (root / "red" / "up").symlink_to("..")
    (root / "green" / "root").symlink_to(root)
    (root / "blue" / "outside").symlink_to(tmp_path)  # contains the root: leads back into it
    found = scan(root)
    assert len(found.files) == 6 and not any("/up/" in r or "/root/" in r or "/outside/" in r for r in rels(found))
    assert not found.failures and not found.unreadable


def test_folder_links_are_followed_each_real_folder_once_real_paths_first(tmp_path):
    root = make_folder(tmp_path / "images", per_class=1, classes=("red", "yellow"))
    (root / "a_link_to_yellow").symlink_to(root / "yellow")  # sorts first, yet the real path wins
    make_image(tmp_path / "elsewhere" / "x.png", COLORS["blue"], 1)
    (root / "blue").symlink_to(tmp_path / "elsewhere")
    (root / "blue_again").symlink_to(tmp_path / "elsewhere")
    found = scan(root)
    assert rels(found) == ["blue/x.png", "red/red_000.jpg", "yellow/yellow_000.jpg"]
    assert [f.label for f in found.files] == ["blue", "red", "yellow"]


def test_entries_that_are_not_readable_files_are_failures_with_reasons(tmp_path):
    root = make_folder(tmp_path / "images", per_class=1, classes=("red",))
    (root / "dangling.jpg").symlink_to(tmp_path / "missing.jpg")
    (root / "a.jpg").symlink_to(root / "b.jpg")
    (root / "b.jpg").symlink_to(root / "a.jpg")
    os.mkfifo(root / "wait.jpg")
    (root / "zero.jpg").symlink_to("/dev/zero")
    fd = os.open(os.fsencode(root) + b"/caf\xe9.jpg", os.O_WRONLY | os.O_CREAT, 0o644)
    os.close(fd)
    found = scan(root)
    assert rels(found) == ["red/red_000.jpg"]
    reasons = {f.path: f.reason for f in found.failures}
    assert reasons == {
        "a.jpg": "symlink loop (the link leads back to itself)",
        "b.jpg": "symlink loop (the link leads back to itself)",
        "caf\\xe9.jpg": "file name is not valid UTF-8; rename it",
        "dangling.jpg": f"broken link: its target {tmp_path / 'missing.jpg'} does not exist",
        "wait.jpg": "not a regular file (a named pipe)",
        "zero.jpg": "not a regular file (a character device)",
    }
    assert all(f.mtime_ns > 0 for f in found.failures)  # keyed by the entry's own stat, for re-runs


def test_non_utf8_folder_name_fails_its_images_not_the_scan(tmp_path):
    root = tmp_path / "images"
    make_image(root / "ok.jpg", COLORS["red"], 0)
    bad = os.fsencode(root) + b"/d\xff"
    os.mkdir(bad)
    make_image(root / os.fsdecode(b"d\xff") / "in.jpg", COLORS["red"], 1)
    found = scan(root)
    assert rels(found) == ["ok.jpg"]
    assert [(f.path, f.reason) for f in found.failures] == [("d\\xff/in.jpg", "folder name is not valid UTF-8; "
                                                                              "rename it")]
    assert printable(os.fsdecode(b"d\xff/in.jpg")) == "d\\xff/in.jpg"


def test_unreadable_folders_and_broken_folder_links_are_reported(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "images", per_class=1)
    (root / "green" / "green_000.jpg").unlink()
    (root / "green").rmdir()
    (root / "green").symlink_to(tmp_path / "unmounted")
    (root / "loop").symlink_to(root / "loop")
    real_scandir = os.scandir

    def scandir(path):
        if str(path).endswith("/red"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    found = scan(root)
    assert rels(found) == ["blue/blue_000.jpg"]
    assert found.unreadable == {"green": f"broken link: its target {tmp_path / 'unmounted'} does not exist",
                                "loop": "symlink loop (the link leads back to itself)",
                                "red": "unreadable: Permission denied"}
    assert found.under_unreadable("red/red_000.jpg") and not found.under_unreadable("redder/x.jpg")


def test_an_unreadable_root_is_an_error(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "images", per_class=1)

    def scandir(path):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(TlEmbedError, match="cannot read .*images: unreadable: Permission denied"):
        scan(root)
