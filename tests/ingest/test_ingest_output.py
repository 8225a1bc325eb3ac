"""pipelines.ingest.output: where an output may live, the fingerprint that ties it to its inputs and config,
and the refusals that keep one run from deleting its inputs or silently reusing another run's shards."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.config import ConfigError
from pipelines.formats import shards
from pipelines.ingest import output, writer
from pipelines.ingest.config import IngestConfig


def write_urls(path: Path, n: int = 4) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"url": f"http://127.0.0.1:9/{i}.jpg", "caption": f"caption {i}"} for i in range(n)]
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def config(input_uri: str, output_uri: str, *extra: str):
    return IngestConfig.load(["--input", input_uri, "--output", output_uri, *extra])


def fake_shard(output_uri: str, shard_id: int = 0) -> None:
    """A committed shard as the writer leaves it (what decides 'this output holds shards')."""
    writer.write_shard(output_uri, shard_id, [{"key": f"{shard_id:05d}0000", "status": "failed_to_download",
                                               "row_index": 0, "shard_id": shard_id, "url": "u"}])  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# Finding: overwrite deleted inputs under the output; `/` and bucket roots were accepted


@pytest.mark.parametrize(
    "layout",
    ["input-file-in-output", "input-folder-is-output-subfolder", "input-glob-in-output", "relative-dots"],
)
def test_an_output_that_contains_an_input_is_refused_and_the_input_survives(tmp_path, layout, monkeypatch):
    out = tmp_path / "out"
    if layout == "input-file-in-output":
        input_uri = write_urls(out / "lists" / "urls.parquet")
    elif layout == "input-folder-is-output-subfolder":
        write_urls(out / "lists" / "a.parquet")
        input_uri = str(out / "lists")
    elif layout == "input-glob-in-output":
        write_urls(out / "lists" / "a.parquet")
        input_uri = str(out / "lists" / "*.parquet")
    else:
        monkeypatch.chdir(tmp_path)
        write_urls(out / "urls.parquet")
        input_uri = "./out/../out/urls.parquet"
    for mode in ("incremental", "overwrite"):
        cfg = config(input_uri, str(out), "--incremental-mode", mode)
        with pytest.raises(ConfigError, match="contains the input") as refused:
            output.prepare(cfg)
        assert "\n" not in str(refused.value)
    assert [p.name for p in (out).rglob("*.parquet")]  # nothing deleted


def test_an_output_reached_through_a_symlink_into_the_output_is_refused(tmp_path):
    out = tmp_path / "out"
    input_uri = write_urls(out / "urls.parquet")
    (tmp_path / "alias").symlink_to(out)
    with pytest.raises(ConfigError, match="contains the input"):
        output.prepare(config(input_uri, str(tmp_path / "alias"), "--incremental-mode", "overwrite"))
    assert Path(input_uri).exists()


@pytest.mark.parametrize("where", ["inside-input-folder", "matched-by-glob", "matched-by-recursive-glob"])
def test_an_output_where_the_input_would_read_its_shards_back_is_refused(tmp_path, where):
    data = tmp_path / "data"
    write_urls(data / "a.parquet")
    input_uri = {
        "inside-input-folder": str(data),
        "matched-by-glob": str(data / "*" / "*.parquet"),
        "matched-by-recursive-glob": str(data / "**" / "*.parquet"),
    }[where]
    with pytest.raises(ConfigError, match="inside the input folder|matched by the input glob"):
        output.prepare(config(input_uri, str(data / "shards")))
    assert not (data / "shards").exists()


def test_an_output_beside_the_input_files_that_the_glob_cannot_match_is_accepted(tmp_path):
    data = tmp_path / "data"
    write_urls(data / "a.parquet")
    cfg = config(str(data / "*.parquet"), str(data / "shards"))  # '*' stays inside one folder
    output.prepare(cfg)
    assert (data / "shards" / output.FINGERPRINT_NAME).exists()


def test_a_local_output_on_a_cluster_of_several_nodes_is_refused_and_s3_is_not(tmp_path):
    local_cfg = config(write_urls(tmp_path / "urls.parquet"), str(tmp_path / "out"))
    output.check_shared(local_cfg, alive_nodes=1)
    with pytest.raises(ConfigError, match=r"local path but the Ray cluster has 3 nodes.*s3://"):
        output.check_shared(local_cfg, alive_nodes=3)
    output.check_shared(config(str(tmp_path / "urls.parquet"), "s3://bucket/out"), alive_nodes=3)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("out", ["/", "s3://bucket", "s3://bucket/", "s3://bucket//"])
def test_the_filesystem_root_and_bucket_roots_are_refused(tmp_path, out):
    cfg = config(write_urls(tmp_path / "urls.parquet"), out, "--incremental-mode", "overwrite")
    with pytest.raises(ConfigError, match="root"):
        output.check_location(cfg)


def test_overwrite_refuses_a_folder_that_is_not_an_ingest_output(tmp_path):
    out = tmp_path / "home"
    (out / "notes").mkdir(parents=True)
    (out / "notes" / "thesis.tex").write_text("years of work")
    cfg = config(write_urls(tmp_path / "urls.parquet"), str(out), "--incremental-mode", "overwrite")
    with pytest.raises(ConfigError, match="not an ingest output"):
        output.prepare(cfg)
    assert (out / "notes" / "thesis.tex").read_text() == "years of work"


def test_overwrite_replaces_an_ingest_output(tmp_path):
    out = tmp_path / "out"
    input_uri = write_urls(tmp_path / "urls.parquet")
    output.prepare(config(input_uri, str(out)))
    fake_shard(str(out))
    output.prepare(config(input_uri, str(out), "--image-size", "64", "--incremental-mode", "overwrite"))
    assert not shards.committed_shards(str(out))
    recorded = json.loads((out / output.FINGERPRINT_NAME).read_text())
    assert recorded["config"]["image_size"] == 64


# ---------------------------------------------------------------------------------------------------------
# Finding: another run's output was reused silently


@pytest.mark.parametrize(
    "change, named",
    [
        (("--image-size", "64"), "image_size was 256, now 64"),
        (("--resize-mode", "center_crop"), "resize_mode"),
        (("--output-format", "webp"), "output_format"),
        (("--min-image-size", "10"), "filters.min_image_size"),
        (("--samples-per-shard", "3"), "samples_per_shard"),
        (("--caption-col", ""), "caption_col"),
        (("--set", "dedup.content=false"), "dedup.content"),
        (("--set", "allowed_formats=[JPEG]"), "allowed_formats"),
        (("--set", "max_jpeg_scans=5"), "max_jpeg_scans"),
    ],
)
def test_a_rerun_with_other_output_deciding_config_is_refused_naming_the_field(tmp_path, change, named):
    out, input_uri = str(tmp_path / "out"), write_urls(tmp_path / "urls.parquet")
    output.prepare(config(input_uri, out))
    fake_shard(out)
    with pytest.raises(ConfigError) as refused:
        output.prepare(config(input_uri, out, *change))
    message = str(refused.value)
    assert named in message and "new output" in message and "overwrite" in message and "\n" not in message


@pytest.mark.parametrize("change", ["grown", "shrunk", "replaced-same-size", "file-added", "file-removed"])
def test_a_rerun_on_a_changed_input_is_refused_naming_the_file(tmp_path, change):
    data = tmp_path / "lists"
    first = write_urls(data / "a.parquet", n=4)
    second = write_urls(data / "b.parquet", n=4)
    out = str(tmp_path / "out")
    output.prepare(config(str(data), out))
    fake_shard(out)
    if change == "grown":
        write_urls(data / "a.parquet", n=40)
    elif change == "shrunk":
        write_urls(data / "a.parquet", n=1)
    elif change == "replaced-same-size":
        before = os.stat(first)
        write_urls(data / "a.parquet", n=4)
        os.utime(first, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000_000))
    elif change == "file-added":
        write_urls(data / "c.parquet")
    else:
        os.unlink(second)
    with pytest.raises(ConfigError, match=r"holds another run's shards \(input .*(changed|new|gone)"):
        output.prepare(config(str(data), out))


def test_a_resumed_run_with_other_operational_settings_is_accepted(tmp_path):
    out, input_uri = str(tmp_path / "out"), write_urls(tmp_path / "urls.parquet")
    output.prepare(config(input_uri, out))
    fake_shard(out)
    output.prepare(
        config(
            input_uri,
            out,
            "--download-workers",
            "7",
            "--timeout-s",
            "60",
            "--max-retries",
            "5",
            "--mlflow-experiment",
            "other",
        )  # fmt: skip
    )
    assert shards.committed_shards(out) == {0}


def test_an_output_fingerprinted_before_a_field_was_added_is_still_recognised(tmp_path):
    # Fingerprints written before filters.max_caption_words was a config field do not name it.
    out, input_uri = str(tmp_path / "out"), write_urls(tmp_path / "urls.parquet")
    output.prepare(config(input_uri, out))
    fingerprint = Path(out) / output.FINGERPRINT_NAME
    recorded = json.loads(fingerprint.read_text())
    del recorded["config"]["filters.max_caption_words"]
    fingerprint.write_text(json.dumps(recorded))
    fake_shard(out)
    output.prepare(config(input_uri, out))
    assert shards.committed_shards(out) == {0}
    with pytest.raises(ConfigError, match="filters.max_caption_words was None, now 5"):
        output.prepare(config(input_uri, out, "--set", "filters.max_caption_words=5"))


def test_shards_without_a_fingerprint_are_not_adopted(tmp_path):
    out, input_uri = str(tmp_path / "out"), write_urls(tmp_path / "urls.parquet")
    fake_shard(out)
    with pytest.raises(ConfigError, match="no fingerprint.json"):
        output.prepare(config(input_uri, out))


def test_the_cli_refuses_another_runs_output_before_writing_anything(tmp_path):
    # The review's case: other input and other image size into a finished output. Nothing may change there.
    out = tmp_path / "out"
    first = write_urls(tmp_path / "first.parquet", n=4)
    output.prepare(config(first, str(out), "--image-size", "32"))
    fake_shard(str(out))
    (out / "config.yaml").write_text(config(first, str(out), "--image-size", "32").to_yaml())
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    other = write_urls(tmp_path / "other.parquet", n=20)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    result = subprocess.run(
        [sys.executable, "-m", "pipelines.ingest", "--input", other, "--output", str(out), "--image-size", "64"],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ingest: output"), result.stderr
    assert "is gone" in lines[0] and "is new" in lines[0] and "image_size was 32, now 64" in lines[0], lines
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_the_cli_stops_with_one_line_and_exit_code_2_on_a_missing_input(tmp_path):
    missing, out = tmp_path / "missing.parquet", tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    result = subprocess.run(
        [sys.executable, "-m", "pipelines.ingest", "--input", str(missing), "--output", str(out)],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"ingest: input {missing}"), result.stderr
    assert not result.stdout.strip()
