"""The code fingerprint: any edit, rename or new module under transfer/ changes it."""

from __future__ import annotations

from pathlib import Path

from transfer import fingerprint


def _tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_source_digest_follows_every_edit(tmp_path: Path) -> None:
    files = {"a.py": "x = 1\n", "sub/b.py": "y = 2\n", "notes.txt": "not code"}
    base = fingerprint.source_digest(_tree(tmp_path / "base", files))
    assert fingerprint.source_digest(_tree(tmp_path / "same", files)) == base  # paths are relative
    variants = {
        "edit": {**files, "a.py": "x = 1  # comment\n"},
        "rename": {"a2.py": "x = 1\n", "sub/b.py": "y = 2\n"},
        "new module": {**files, "sub/c.py": ""},
        "content moved between files": {"a.py": "x = 1\ny = 2\n", "sub/b.py": ""},
    }
    for name, tree in variants.items():
        assert fingerprint.source_digest(_tree(tmp_path / name.replace(" ", "_"), tree)) != base, name
    assert fingerprint.source_digest(_tree(tmp_path / "txt", {**files, "notes.txt": "edited"})) == base


def test_code_fingerprint_is_the_version_and_the_sources_once_per_process() -> None:
    whole, data = fingerprint.code_fingerprint(), fingerprint.code_fingerprint("data")
    assert len(whole) == 16 and whole != data
    assert fingerprint.code_fingerprint() is whole  # computed once
    assert fingerprint.package_version()
