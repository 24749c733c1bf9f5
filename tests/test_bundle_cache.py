"""The persistent cache of test bundles (RMT_TEST_CACHE, local reruns only): keyed by the code
that makes the bundles, and it removes only the folders of its own older keys."""
import shutil

import tests.conftest as conftest


def test_the_key_follows_the_code_that_makes_the_bundles(tmp_path, monkeypatch):
    root = tmp_path / "tree"
    for source in conftest.CACHE_SOURCES:
        target = root / source
        target.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if (conftest.ROOT / source).is_dir() else shutil.copyfile)(conftest.ROOT / source, target)
    monkeypatch.setattr(conftest, "ROOT", root)
    key = conftest.bundle_code_key()
    assert key == conftest.bundle_code_key()
    exporter = root / "export" / "exporter.py"
    exporter.write_text(exporter.read_text() + "\n# a change\n")
    assert conftest.bundle_code_key() != key


def test_the_cache_removes_only_its_own_older_keys(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    old, mine = cache / "0123456789abcdef", cache / "notes"
    (old / "bundles").mkdir(parents=True)
    mine.mkdir()
    (cache / "fedcba9876543210.txt").write_text("a user's file named like a key")
    monkeypatch.setenv("RMT_TEST_CACHE", str(cache))
    current = conftest.persistent_cache()
    assert current == cache.resolve() / conftest.bundle_code_key() and current.is_dir()
    assert not old.exists() and mine.is_dir() and (cache / "fedcba9876543210.txt").is_file()
    monkeypatch.delenv("RMT_TEST_CACHE")
    assert conftest.persistent_cache() is None
