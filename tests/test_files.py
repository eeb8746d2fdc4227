import pytest

from overfill.files import atomic_file, publish_dir, write_text_atomic


def test_atomic_file_replaces_only_when_the_block_succeeds(tmp_path):
    path = tmp_path / "sub" / "result.json"
    write_text_atomic(path, "old")
    with pytest.raises(RuntimeError):
        with atomic_file(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError("disk full")
    assert path.read_text() == "old" and not tmp.exists()
    with atomic_file(path) as tmp:
        tmp.write_text("new")
        assert path.read_text() == "old"  # not yet
    assert path.read_text() == "new" and [p.name for p in path.parent.iterdir()] == ["result.json"]


def test_publish_dir_swaps_a_finished_directory_in_and_leaves_no_trash(tmp_path):
    final = tmp_path / "model"
    for content in ("first", "second"):
        tmp = tmp_path / f".tmp-{content}"
        tmp.mkdir()
        (tmp / "weights").write_text(content)
        publish_dir(tmp, final)
        assert (final / "weights").read_text() == content and not tmp.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_publish_dir_clears_the_trash_of_an_earlier_cut_short_run(tmp_path):
    (tmp_path / ".trash-model").mkdir()
    (tmp_path / ".trash-model" / "stale").write_text("x")
    tmp = tmp_path / ".tmp"
    tmp.mkdir()
    publish_dir(tmp, tmp_path / "model")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
