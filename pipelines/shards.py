"""Reading WebDataset tars: consecutive members that share a key form one sample. The key is the member's
name up to the first dot of its base name, within its folder, as webdataset groups them."""

from __future__ import annotations

import tarfile
from collections.abc import Container, Iterator

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def tar_samples(
    tar: tarfile.TarFile, keep: Container[str] | None = None
) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) per sample, in tar order, from a tar opened for streaming ("r|").
    Extensions are lower-cased; with `keep`, other members are skipped unread, but their sample is still
    yielded (perhaps with no members), so callers can count every sample the tar holds."""
    key, members = None, {}
    for member in tar:
        if not member.isfile():
            continue
        folder, _, base = member.name.rpartition("/")
        stem, _, ext = base.partition(".")
        member_key = f"{folder}/{stem}" if folder else stem
        if member_key != key and key is not None:
            yield key, members
            members = {}
        key = member_key
        ext = ext.lower()
        if keep is None or ext in keep:
            members[ext] = tar.extractfile(member).read()
    if key is not None:
        yield key, members
