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


def test_an_output_may_neither_be_nor_hold_nor_lie_inside_an_input(tmp_path):
    from overfill.errors import OverfillError
    from overfill.files import check_not_an_input

    model, data = tmp_path / "models" / "full", tmp_path / "data.jsonl"
    model.mkdir(parents=True)
    data.write_text("{}\n")
    inputs = {"--full": model, "--data": data, "--hub": "org/name", "--none": None}  # no local path: skipped
    for out, words in ((model, "is the --full"), (model / "sub", "inside the --full"), (tmp_path / "models", "holds"),
                       (tmp_path, "holds"), (data, "is the --data")):
        with pytest.raises(OverfillError, match=words):
            check_not_an_input(out, inputs)
    (tmp_path / "link").symlink_to(model)
    with pytest.raises(OverfillError, match="is the --full"):
        check_not_an_input(tmp_path / "link", inputs)  # after links
    check_not_an_input(tmp_path / "out", inputs)
    check_not_an_input(tmp_path / "models" / "other", inputs)


@pytest.mark.parametrize("error,errno_found", [
    (OSError(28, "No space left on device"), 28),
    (PermissionError(13, "Permission denied"), 13),
    (RuntimeError("Error while serializing: I/O error: Read-only file system (os error 30)"), 30),
    (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 72384 vs 72276"), 5),
    (OSError(2, "No such file or directory"), None),  # a missing input, not a write failure
    (RuntimeError("Error while serializing: I/O error: no such file (os error 2)"), None),
    (ValueError("a bug"), None),
])
def test_write_error_reads_each_writers_report_of_a_failed_write(error, errno_found):
    from overfill.files import write_error

    found = write_error(error)
    assert (found.errno if found is not None else None) == errno_found


def test_a_staged_directory_is_published_whole_or_not_at_all(tmp_path):
    from overfill.files import staged_dir

    with pytest.raises(OSError):
        with staged_dir(tmp_path / "out") as tmp:
            (tmp / "half").write_text("x")
            raise OSError(28, "No space left on device")
    assert list(tmp_path.iterdir()) == []
    with staged_dir(tmp_path / "out") as tmp:
        (tmp / "whole").write_text("x")
        assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (tmp_path / "out" / "whole").is_file()
