"""Reading evaluation sets and suites, and the one-sentence stops on bad input: the suite config, the three
dataset layouts (image folder, CLIP_benchmark's WebDataset, ingest shards with several captions per image),
missing or mismatched checkpoints, empty datasets and class names that do not match the data."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import webdataset as wds

import clip_core
from pipelines.config import ConfigError
from pipelines.demo import scenes
from pipelines.demo.data import write_classification_folder, write_retrieval_shards
from pipelines.evaluate import config, datasets, job
from pipelines.evaluate.features import _work_item_samples, extract_features_locally, work_items
from tests.paths import CONFIGS


def one_sentence(message: str) -> bool:
    return message.count(". ") == 0 and message.endswith(".")


def suite_for(*entries: dict) -> config.SuiteConfig:
    return config.validate_suite({"datasets": list(entries)})


@pytest.fixture(scope="module")
def color_folder(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("color") / "set"
    write_classification_folder(str(root), "color", 20, seed=3, size=32)
    return str(root)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> str:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    clip_core.save_checkpoint(clip_core.create_model("ViT-Tiny-16"), path)
    return str(path)


# ---------------------------------------------------------------------------------------------------------
# Suite config


def test_suite_yaml_parses_with_defaults_and_round_trips(tmp_path):
    path = tmp_path / "suite.yaml"
    path.write_text(
        "datasets:\n  - {name: imagenet, uri: s3://b/imagenet/val, classnames: imagenet, templates: imagenet}\n"
        "  - {name: coco, uri: s3://b/coco, tasks: [zeroshot_retrieval]}\nbatch_size: 128\n"
    )
    suite = config.load_suite(str(path))
    assert [d.name for d in suite.datasets] == ["imagenet", "coco"]
    assert suite.datasets[0].tasks == ["zeroshot_classification"] and suite.recall_k == [1, 5, 10]
    assert config.validate_suite(__import__("yaml").safe_load(suite.to_yaml())) == suite


def test_suite_errors_are_one_sentence_naming_the_field():
    with pytest.raises(ConfigError) as error:
        config.validate_suite({"datasets": [{"name": "x", "uri": "/d", "templats": ["a {c}"]}]})
    assert "datasets.0.templats is not a known field" in str(error.value) and one_sentence(str(error.value))
    with pytest.raises(ConfigError, match="has no \\{c\\} placeholder"):
        config.validate_suite({"datasets": [{"name": "x", "uri": "/d", "templates": ["a photo"]}]})
    with pytest.raises(ConfigError, match="appears more than once"):
        suite_for({"name": "x", "uri": "/a"}, {"name": "x", "uri": "/b"})


def test_command_line_builds_a_suite_from_dataset_specs_tasks_and_overrides():
    suite = config.EvaluateConfig.load(
        [
            "--checkpoint",
            "c.pt",
            "--model",
            "ViT-Tiny-16",
            "--dataset",
            "colors=s3://b/eval/color",
            "--dataset",
            "s3://b/eval/coco",
            "--task",
            "zeroshot_retrieval",
            "--set",
            "batch_size=32",
        ]
    ).suite
    assert [(d.name, d.uri) for d in suite.datasets] == [
        ("colors", "s3://b/eval/color"),
        ("coco", "s3://b/eval/coco"),
    ]
    assert suite.datasets[1].tasks == ["zeroshot_retrieval"] and suite.batch_size == 32
    with pytest.raises(ConfigError, match="no dataset to evaluate"):
        config.EvaluateConfig.load(["--checkpoint", "c.pt", "--model", "ViT-Tiny-16"])


# ---------------------------------------------------------------------------------------------------------
# Dataset layouts


def test_image_folder_labels_follow_sorted_folders_named_by_classnames_txt(color_folder):
    opened = datasets.open_dataset(config.DatasetConfig(name="color", uri=color_folder))
    assert opened.format == "image_folder" and opened.classnames == sorted(scenes.COLORS)
    assert opened.templates == list(scenes.COLOR_PROMPTS)
    assert len(opened.items) == 20
    for item in opened.items:
        assert f"/{opened.classnames[item['label']]}/" in item["uri"]


def test_wds_layout_is_read_as_clip_benchmark_writes_it(tmp_path, color_folder):
    (tmp_path / "test").mkdir()
    (tmp_path / "classnames.txt").write_text("red\ngreen\nblue\n")
    (tmp_path / "zeroshot_classification_templates.txt").write_text("a {c} thing\n")
    jpeg = next(
        iter(
            datasets.read_item(
                datasets.open_dataset(config.DatasetConfig(name="c", uri=color_folder)).items[0]
            )
        )
    )["image"]
    with wds.ShardWriter(str(tmp_path / "test" / "%d.tar"), maxcount=2, verbose=0) as sink:
        for i, label in enumerate([2, 0, 1]):
            sink.write({"__key__": f"s{i:07d}", "jpg": jpeg, "cls": label})
    (tmp_path / "test" / "nshards.txt").write_text("2\n")
    opened = datasets.open_dataset(config.DatasetConfig(name="w", uri=str(tmp_path)))
    assert opened.format == "wds" and opened.templates == ["a {c} thing"] and len(opened.items) == 2
    samples = [s for item in opened.items for s in datasets.read_item(item)]
    assert [s["label"] for s in samples] == [2, 0, 1] and all(s["image"] == jpeg for s in samples)
    with pytest.raises(datasets.DatasetError, match="has no split 'train'"):
        datasets.open_dataset(config.DatasetConfig(name="w", uri=str(tmp_path)), train=True)


def test_samples_an_ingest_shards_stats_exclude_are_not_evaluated(tmp_path):
    """A content duplicate found after its tar was written stays in the tar, listed as excluded in the stats;
    evaluation, like training, leaves it out (and any path through the Ray work items keeps the list)."""
    write_retrieval_shards(str(tmp_path), 6, seed=4, captions_per_image=1, per_shard=6)
    stats_path = tmp_path / "00000_stats.json"
    stats = json.loads(stats_path.read_text())
    opened = datasets.open_dataset(config.DatasetConfig(name="r", uri=str(tmp_path)))
    keys = [s["key"].rsplit("#", 1)[1] for s in datasets.read_item(opened.items[0])]
    stats["excluded_keys"] = keys[1:3]
    stats_path.write_text(json.dumps(stats))
    opened = datasets.open_dataset(config.DatasetConfig(name="r", uri=str(tmp_path)))
    kept = [s["key"].rsplit("#", 1)[1] for s in datasets.read_item(opened.items[0])]
    assert kept == [keys[0], *keys[3:]]
    (item,) = work_items([opened])
    assert len(list(_work_item_samples(item))) == 4


def test_ingest_shards_carry_several_captions_per_image(tmp_path):
    write_retrieval_shards(str(tmp_path), 12, seed=4, captions_per_image=3, per_shard=5)
    opened = datasets.open_dataset(config.DatasetConfig(name="r", uri=str(tmp_path)))
    assert opened.format == "ingest" and len(opened.items) == 3
    samples = [s for item in opened.items for s in datasets.read_item(item)]
    assert len(samples) == 12
    for index, sample in enumerate(samples):
        scene = scenes.make_scene(index, seed=4)
        assert sample["captions"][0] == scene.caption and len(set(sample["captions"])) == 3
        assert all(scene.color in c and scene.shape in c for c in sample["captions"])


# ---------------------------------------------------------------------------------------------------------
# Bad input stops with one sentence


def test_empty_dataset_stops_with_one_sentence(tmp_path):
    with pytest.raises(datasets.DatasetError) as error:
        datasets.open_dataset(config.DatasetConfig(name="e", uri=str(tmp_path / "nothing")))
    assert "is empty or does not exist" in str(error.value) and one_sentence(str(error.value))


def test_class_names_that_do_not_match_the_folders_stop_with_one_sentence(tmp_path, color_folder):
    cfg = config.DatasetConfig(name="color", uri=color_folder, classnames=["red", "green"])
    with pytest.raises(datasets.DatasetError) as error:
        datasets.open_dataset(cfg)
    assert "2 names but 8 class folders" in str(error.value) and one_sentence(str(error.value))


def test_class_names_that_do_not_match_the_shards_stop_with_one_sentence(
    tmp_path, color_folder, tiny_checkpoint
):
    (tmp_path / "test").mkdir()
    (tmp_path / "classnames.txt").write_text("red\ngreen\n")
    (tmp_path / "zeroshot_classification_templates.txt").write_text("a {c} thing\n")
    jpeg = (next(p for p in __import__("pathlib").Path(color_folder).rglob("*.jpg"))).read_bytes()
    with wds.ShardWriter(str(tmp_path / "test" / "%d.tar"), verbose=0) as sink:
        for i, label in enumerate([0, 1, 4]):
            sink.write({"__key__": f"s{i:07d}", "jpg": jpeg, "cls": label})
    (tmp_path / "test" / "nshards.txt").write_text("1\n")
    opened = datasets.open_dataset(config.DatasetConfig(name="w", uri=str(tmp_path)))
    model, _ = job.load_model("ViT-Tiny-16", tiny_checkpoint)
    features = extract_features_locally(opened, model, 64)
    with pytest.raises(datasets.DatasetError) as error:
        job._check_classification_set(opened, features)
    assert "labels go up to 4 but 2 class names are given" in str(error.value)
    assert one_sentence(str(error.value))


def run_cli(*argv: str) -> str:
    """The one line `python -m pipelines.evaluate` prints on stderr when it stops, after checking it exits 2."""
    result = subprocess.run(
        [sys.executable, "-m", "pipelines.evaluate", *argv], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    return result.stderr.strip()


def test_missing_checkpoint_stops_the_cli_with_one_sentence(tmp_path, color_folder):
    message = run_cli(
        "--checkpoint",
        str(tmp_path / "nope.pt"),
        "--model",
        "ViT-Tiny-16",
        "--dataset",
        color_folder,
    )
    assert (
        message == f"evaluate: checkpoint {tmp_path / 'nope.pt'} does not exist; check the --checkpoint URI."
    )


def test_checkpoint_folder_without_checkpoint_json_is_refused(tmp_path, color_folder):
    (tmp_path / "step_00000100").mkdir()
    (tmp_path / "step_00000100" / "model.pt").write_bytes(b"partial")
    message = run_cli(
        "--checkpoint",
        str(tmp_path / "step_00000100"),
        "--model",
        "ViT-Tiny-16",
        "--dataset",
        color_folder,
    )
    assert "has no checkpoint.json, so it is an incomplete training checkpoint" in message
    assert one_sentence(message)


def test_checkpoint_of_another_architecture_stops_with_one_sentence(tiny_checkpoint):
    wide = clip_core.get_model_config("ViT-Tiny-16")
    wide["embed_dim"] *= 2
    clip_core.add_model_config(wide, "ViT-Tiny-16-wide-test")
    with pytest.raises(job.EvaluationError) as error:
        job.load_model("ViT-Tiny-16-wide-test", tiny_checkpoint)
    message = str(error.value)
    assert message.startswith(f"checkpoint {tiny_checkpoint} does not match model ViT-Tiny-16-wide-test")
    assert "pass the --model the checkpoint was trained with" in message and one_sentence(message)
    with pytest.raises(job.EvaluationError, match="unknown model 'ViT-Nope'"):
        job.load_model("ViT-Nope", tiny_checkpoint)


@pytest.mark.parametrize("name", ["eval-scenes.yaml", "eval-imagenet.yaml"])
def test_shipped_suite_configs_validate(name):

    suite = config.load_suite(str(CONFIGS / name))
    assert suite.datasets and all(d.uri.startswith("s3://") for d in suite.datasets)
    if name == "eval-imagenet.yaml":
        assert suite.datasets[0].classnames == "imagenet" and suite.datasets[0].templates == "imagenet"
