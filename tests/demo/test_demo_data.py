"""pipelines.demo.data: the held-out classification folders hold every class, balanced, with names and
templates, and read the same on local disk and S3."""

from __future__ import annotations

from pipelines.demo import data, scenes


def test_classification_folder_holds_every_class_balanced_with_names_and_templates(tmp_path):
    from PIL import Image

    classes = data.write_classification_folder(str(tmp_path), "shape", 19, seed=2, size=40)
    assert classes == sorted(scenes.SHAPES)
    assert (tmp_path / "classnames.txt").read_text().split("\n")[:-1] == classes
    templates = (tmp_path / "zeroshot_classification_templates.txt").read_text().splitlines()
    assert templates == list(scenes.SHAPE_PROMPTS) and all("{c}" in t for t in templates)
    counts = {c: len(list((tmp_path / c).glob("*.jpg"))) for c in classes}
    assert sorted(counts.values()) == [2, 2, 2, 2, 2, 3, 3, 3] and sum(counts.values()) == 19
    for shape in classes:
        for path in (tmp_path / shape).glob("*.jpg"):
            index = int(path.stem)
            assert scenes.make_scene(index, seed=2, size=(40, 40)).shape == shape
            assert Image.open(path).size == (40, 40)


def test_classification_folder_on_s3_matches_the_local_one(local_stack_env, s3_prefix, tmp_path):
    from pipelines import storage

    data.write_classification_folder(str(tmp_path), "color", 8, seed=4, size=32)
    data.write_classification_folder(s3_prefix, "color", 8, seed=4, size=32)
    local = {e.uri[len(str(tmp_path)) :]: e.size for e in storage.list_files(str(tmp_path))}
    remote = {e.uri[len(s3_prefix) :]: e.size for e in storage.list_files(s3_prefix)}
    assert remote == local and len(local) == 10
