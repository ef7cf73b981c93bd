import shutil
from collections import Counter

import pytest

from training.data import DataError, discover_images, scan_readable, split_records, write_csv_manifest


def test_image_folder_discovery(digits_dir):
    records = discover_images(digits_dir)
    assert len(records) == 60
    assert Counter(r.label for r in records) == {"0": 15, "1": 15, "2": 15, "3": 15}


def test_stratified_split_is_repeatable_and_disjoint(digits_dir):
    records = discover_images(digits_dir)
    a = split_records(records, 0.2, 0.2, seed=3)
    b = split_records(records, 0.2, 0.2, seed=3)
    assert [r.path for r in a.test] == [r.path for r in b.test]
    paths = [r.path for r in a.train + a.val + a.test]
    assert len(paths) == len(set(paths)) == 60
    assert set(Counter(r.label for r in a.test).values()) == {3}  # 20% of 15 per class, stratified
    c = split_records(records, 0.2, 0.2, seed=4)
    assert [r.path for r in a.test] != [r.path for r in c.test]


def test_csv_manifest_with_relative_paths_and_given_splits(digits_dir, tmp_path):
    records = split_records(discover_images(digits_dir)).records()
    manifest = tmp_path / "data.csv"
    write_csv_manifest(records, manifest)
    again = discover_images(manifest)
    assert [(r.path, r.label, r.split) for r in again] == [(r.path.resolve(), r.label, r.split) for r in records]
    splits = split_records(again)
    assert len(splits.test) == sum(r.split == "test" for r in records)

    relative = tmp_path / "relative.csv"
    relative.write_text("path,label\nimages/a.png,cat\n")
    assert discover_images(relative)[0].path == tmp_path / "images" / "a.png"


def test_corrupt_image_is_skipped_and_reported(digits_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(digits_dir, data)
    (data / "1" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (data / "2" / "empty.jpg").write_bytes(b"")
    good, skipped = scan_readable(discover_images(data))
    assert len(good) == 60
    assert {s.path.name for s in skipped} == {"broken.png", "empty.jpg"}
    assert all(s.reason for s in skipped)


@pytest.mark.parametrize(
    "content, message",
    [("file,label\na.png,x\n", "needs columns"), ("path,label,split\na.png,x,holdout\n", "line 2")],
)
def test_bad_manifest_rejected_with_reason(tmp_path, content, message):
    manifest = tmp_path / "m.csv"
    manifest.write_text(content)
    with pytest.raises(DataError, match=message):
        discover_images(manifest)


def test_too_few_images_per_class_is_a_clear_error(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label\na.png,x\nb.png,x\nc.png,x\nd.png,y\n")
    with pytest.raises(DataError, match="fewer than 3"):
        split_records(discover_images(manifest))


def test_missing_source_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="expected an image folder"):
        discover_images(tmp_path / "nowhere")
