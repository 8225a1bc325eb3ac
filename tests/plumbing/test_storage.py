"""pipelines.storage: every helper on a local directory and on s3:// (the local stack's SeaweedFS) alike."""

import dataclasses
import os
import signal
import subprocess
import sys

import fsspec
import pytest
from botocore.exceptions import ClientError

from pipelines import storage
from pipelines.storage import S3Settings

MiB = 1024 * 1024


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path) -> str:
    """A fresh, empty directory: a local path or an s3:// prefix, with the stack's env set for S3."""
    if request.param == "local":
        return str(tmp_path / "root")
    request.getfixturevalue("local_stack_env")
    return request.getfixturevalue("s3_prefix")


# ---------------------------------------------------------------------------------------------------------
# URIs and settings (no service needed)


def test_join_adds_parts_to_s3_uris_and_local_paths():
    assert storage.join("s3://bucket", "shards", "00000.tar") == "s3://bucket/shards/00000.tar"
    assert storage.join("s3://bucket/run/", "/shards/", "00000.tar") == "s3://bucket/run/shards/00000.tar"
    assert storage.join("s3://bucket/run", "") == "s3://bucket/run"
    assert storage.join("/data/run", "shards", "00000.tar") == os.path.join(
        "/data/run", "shards", "00000.tar"
    )


def test_split_s3_gives_bucket_and_key_and_rejects_other_uris():
    assert storage.split_s3("s3://bucket/a/b.tar") == ("bucket", "a/b.tar")
    assert storage.split_s3("s3://bucket") == ("bucket", "")
    assert storage.is_s3("s3://bucket/x") and not storage.is_s3("/tmp/x")
    with pytest.raises(ValueError, match="not an s3"):
        storage.split_s3("/local/path")
    with pytest.raises(ValueError, match="no bucket"):
        storage.split_s3("s3:///key")


def test_settings_come_from_the_aws_environment_with_the_s3_endpoint_and_aws_region_winning():
    env = {
        "AWS_ENDPOINT_URL": "http://general:1",
        "AWS_ENDPOINT_URL_S3": "http://s3-only:2",
        "AWS_ACCESS_KEY_ID": "key-id",
        "AWS_SECRET_ACCESS_KEY": "secret",
        "AWS_SESSION_TOKEN": "token",
        "AWS_REGION": "eu-west-1",
        "AWS_DEFAULT_REGION": "us-east-2",
    }
    assert S3Settings.from_env(env) == S3Settings(
        "http://s3-only:2", "key-id", "secret", "token", "eu-west-1"
    )
    fallback = S3Settings.from_env(
        {"AWS_ENDPOINT_URL": "http://general:1", "AWS_DEFAULT_REGION": "us-east-2"}
    )
    assert (fallback.endpoint_url, fallback.region) == ("http://general:1", "us-east-2")
    assert S3Settings.from_env({}) == S3Settings()


def test_settings_repr_never_shows_credentials():
    settings = S3Settings(
        "http://127.0.0.1:8333", "AKIAEXAMPLEKEYID", "very-secret-value", "session-tok", "r1"
    )
    for text in (repr(settings), str(settings), f"{settings}", repr([settings])):
        assert (
            "very-secret-value" not in text and "session-tok" not in text and "AKIAEXAMPLEKEYID" not in text
        )
        assert "http://127.0.0.1:8333" in text


def test_fsspec_storage_options_carry_endpoint_credentials_and_region():
    settings = S3Settings("http://127.0.0.1:8333", "key-id", "secret", None, "us-east-1")
    options = storage.fsspec_storage_options(settings)
    assert options["endpoint_url"] == "http://127.0.0.1:8333"
    assert (options["key"], options["secret"]) == ("key-id", "secret")
    assert options["client_kwargs"] == {"region_name": "us-east-1"}
    assert "token" not in options


# ---------------------------------------------------------------------------------------------------------
# Helpers, each on a local directory and on S3


def test_write_bytes_then_read_bytes_round_trips(root):
    uri = storage.join(root, "a", "b", "blob.bin")
    storage.write_bytes(uri, b"\x00clip\xff")
    assert storage.read_bytes(uri) == b"\x00clip\xff"
    storage.write_bytes(uri, b"replaced")
    assert storage.read_bytes(uri) == b"replaced"


def test_open_write_streams_many_parts_and_open_read_streams_them_back(root):
    uri = storage.join(root, "shard.tar")
    chunks = [bytes([i]) * MiB for i in range(12)]
    with storage.open_write(uri, part_size=5 * MiB) as out:
        for chunk in chunks:
            out.write(chunk)
    with storage.open_read(uri) as f:
        assert f.read(3) == b"\x00\x00\x00"
        rest = f.read()
    assert b"\x00\x00\x00" + rest == b"".join(chunks)
    if storage.is_s3(uri):  # 12 MiB in 5 MiB parts: a real multipart upload, not one PUT
        bucket, key = storage.split_s3(uri)
        parts = storage.boto3_client().head_object(Bucket=bucket, Key=key, PartNumber=1)
        assert parts["PartsCount"] == 3 and parts["ContentLength"] == 5 * MiB


def test_open_write_publishes_only_when_the_block_ends(root):
    uri = storage.join(root, "shard.tar")
    with storage.open_write(uri) as out:
        out.write(b"first half, ")
        assert not storage.exists(uri)
        out.write(b"second half")
    assert storage.read_bytes(uri) == b"first half, second half"


def test_open_write_that_raises_publishes_nothing_and_keeps_the_old_object(root):
    uri = storage.join(root, "shard.tar")
    storage.write_bytes(uri, b"old, complete shard")
    with pytest.raises(RuntimeError, match="worker died"), storage.open_write(uri, part_size=5 * MiB) as out:
        out.write(b"x" * (6 * MiB))  # one part already uploaded when the failure comes
        raise RuntimeError("worker died")
    assert storage.read_bytes(uri) == b"old, complete shard"
    assert [e.uri for e in storage.list_files(root)] == [uri]  # no temp files left behind
    if storage.is_s3(uri):
        bucket, key = storage.split_s3(uri)
        pending = storage.boto3_client().list_multipart_uploads(Bucket=bucket, Prefix=key)
        assert pending.get("Uploads", []) == []


def test_exists_knows_files_directories_and_missing_paths(root):
    storage.write_bytes(storage.join(root, "dir", "file.bin"), b"1")
    assert storage.exists(storage.join(root, "dir", "file.bin"))
    assert storage.exists(storage.join(root, "dir"))
    assert not storage.exists(storage.join(root, "di"))
    assert not storage.exists(storage.join(root, "dir", "missing.bin"))


def test_list_files_is_recursive_with_sizes_and_stops_at_the_directory_boundary(root):
    storage.write_bytes(storage.join(root, "shards", "0.tar"), b"a")
    storage.write_bytes(storage.join(root, "shards", "sub", "1.tar"), b"bb")
    storage.write_bytes(storage.join(root, "shards-old", "2.tar"), b"ccc")
    listed = storage.list_files(storage.join(root, "shards"))
    assert listed == [
        storage.FileEntry(storage.join(root, "shards", "0.tar"), 1),
        storage.FileEntry(storage.join(root, "shards", "sub", "1.tar"), 2),
    ]
    assert storage.list_files(storage.join(root, "shards") + "/") == listed
    assert storage.list_files(storage.join(root, "nothing-here")) == []
    assert len(storage.list_files(root)) == 3


def test_entries_are_spelt_under_the_listing_root_however_the_folder_is_spelt(root):
    storage.write_bytes(storage.join(root, "shards", "sub", "1.tar"), b"a")
    spellings = [storage.join(root, "shards"), storage.join(root, "shards") + "/"]
    if not storage.is_s3(root):
        spellings.append(storage.join(root, "shards", "sub", ".."))
    for spelling in spellings:
        listing_root = storage.listing_root(spelling)
        (entry,) = storage.list_files(spelling)
        assert entry.uri.startswith(listing_root), spelling
        assert entry.uri[len(listing_root) :] == "/sub/1.tar", spelling


def test_delete_removes_files_and_with_recursive_whole_directories(root):
    storage.write_bytes(storage.join(root, "keep.bin"), b"k")
    for i in range(3):
        storage.write_bytes(storage.join(root, "run", f"{i}.bin"), b"r")
    storage.delete(storage.join(root, "run", "0.bin"))
    assert not storage.exists(storage.join(root, "run", "0.bin"))
    storage.delete(storage.join(root, "run", "0.bin"))  # already gone: fine
    if not storage.is_s3(root):
        with pytest.raises(IsADirectoryError):
            storage.delete(storage.join(root, "run"))
    storage.delete(storage.join(root, "run"), recursive=True)
    assert storage.list_files(root) == [storage.FileEntry(storage.join(root, "keep.bin"), 1)]


def test_publish_file_copies_a_finished_local_file_to_the_uri(root, tmp_path):
    scratch = tmp_path / "scratch.tar"
    scratch.write_bytes(b"shard bytes" * 1000)
    uri = storage.join(root, "published", "00000.tar")
    storage.publish_file(scratch, uri)
    assert storage.read_bytes(uri) == scratch.read_bytes()


def test_pyarrow_filesystem_reads_and_writes_the_same_objects_as_the_helpers(root):
    uri = storage.join(root, "arrow.bin")
    storage.write_bytes(uri, b"from helpers")
    fs, path = storage.pyarrow_filesystem(uri)
    with fs.open_input_stream(path) as f:
        assert f.read() == b"from helpers"
    other = storage.join(root, "nested", "from-arrow.bin")
    fs, path = storage.pyarrow_filesystem(other)
    fs.create_dir(path.rsplit("/", 1)[0])
    with fs.open_output_stream(path) as f:
        f.write(b"from pyarrow")
    assert storage.read_bytes(other) == b"from pyarrow"


def test_fsspec_filesystem_and_storage_options_reach_the_same_objects(root):
    uri = storage.join(root, "fsspec.bin")
    storage.write_bytes(uri, b"from helpers")
    fs, path = storage.fsspec_filesystem(uri)
    assert fs.cat(path) == b"from helpers"
    options = storage.fsspec_storage_options() if storage.is_s3(uri) else {}
    with fsspec.open(storage.join(root, "via-open.bin"), "wb", **options) as f:
        f.write(b"from fsspec.open")
    assert storage.read_bytes(storage.join(root, "via-open.bin")) == b"from fsspec.open"


# ---------------------------------------------------------------------------------------------------------
# S3 clients really use the settings they are given


def test_boto3_client_uses_endpoint_and_credentials_from_the_environment(local_stack_env, s3_prefix):
    client = storage.boto3_client()
    assert client.meta.endpoint_url == local_stack_env["AWS_ENDPOINT_URL"]
    assert client.meta.region_name == local_stack_env["AWS_REGION"]
    bucket, _ = storage.split_s3(s3_prefix)
    client.head_bucket(Bucket=bucket)
    wrong = dataclasses.replace(S3Settings.from_env(), secret_access_key="not-the-secret")
    with pytest.raises(ClientError, match="SignatureDoesNotMatch|AccessDenied|InvalidAccessKeyId"):
        storage.boto3_client(wrong).list_objects_v2(Bucket=bucket, MaxKeys=1)


def test_explicit_settings_work_without_any_aws_environment(local_stack, s3_prefix, monkeypatch):
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    uri = storage.join(s3_prefix, "explicit.bin")
    storage.write_bytes(uri, b"explicit", settings=local_stack.s3_settings)
    assert storage.read_bytes(uri, settings=local_stack.s3_settings) == b"explicit"
    fs, path = storage.pyarrow_filesystem(uri, local_stack.s3_settings)
    with fs.open_input_stream(path) as f:
        assert f.read() == b"explicit"


def _killed_writer(uri: str, size: int, env: dict) -> None:
    """A process that dies (SIGKILL) in the middle of an open_write, after `size` bytes of 5 MiB parts."""
    script = (
        "import os, signal, sys\n"
        "from pipelines import storage\n"
        "with storage.open_write(sys.argv[1], part_size=5 * 1024 * 1024) as out:\n"
        "    out.write(os.urandom(int(sys.argv[2])))\n"
        "    out.flush()\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    result = subprocess.run([sys.executable, "-c", script, uri, str(size)], env=env, timeout=120)
    assert result.returncode == -signal.SIGKILL


def test_remove_unfinished_writes_clears_what_killed_writers_left_and_nothing_else(root):
    storage.write_bytes(storage.join(root, "kept.bin"), b"finished")
    storage.write_bytes(storage.join(root, "sub", ".hidden.partial.txt"), b"not ours")
    for name in ("a.tar", "sub/b.parquet"):
        _killed_writer(storage.join(root, name), 6 * MiB, dict(os.environ))
    if storage.is_s3(root):
        client = storage.boto3_client()
        bucket, key = storage.split_s3(root)
        uploads = client.list_multipart_uploads(Bucket=bucket, Prefix=key + "/").get("Uploads", [])
        assert len(uploads) == 2
    else:
        assert len([e for e in storage.list_files(root) if e.uri.endswith(".partial")]) == 2
    assert storage.remove_unfinished_writes(root) == 2
    assert [e.uri.removeprefix(root) for e in storage.list_files(root)] == [
        "/kept.bin",
        "/sub/.hidden.partial.txt",
    ]
    if storage.is_s3(root):
        assert not client.list_multipart_uploads(Bucket=bucket, Prefix=key + "/").get("Uploads", [])
    assert storage.remove_unfinished_writes(root) == 0


def test_version_tells_a_changed_file_from_the_same_one(root):
    uri = storage.join(root, "urls.parquet")
    storage.write_bytes(uri, b"first content")
    first = storage.version(uri)
    assert first["size"] == len(b"first content") and first == storage.version(uri)
    storage.write_bytes(uri, b"other content, longer")
    assert storage.version(uri) != first
    assert storage.version(uri)["size"] == len(b"other content, longer")
