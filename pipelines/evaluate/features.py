"""Image features of evaluation sets as one Ray Data job: tasks read work items (a tar shard or a group of
image files) and decode them at reduced size into uint8 pixels; an actor pool (GPUs when present) normalises
and encodes them with the image tower. Ray streams the stages, so decoding overlaps the forward passes.
"""

from __future__ import annotations

import functools
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

import clip_core
from pipelines.evaluate.datasets import EvalSet, read_item
from pipelines.formats.shards import TAR_EXT


def decode_image(data: bytes, image_size: int, reduced_decode: bool = False) -> np.ndarray:
    """Encoded image -> uint8 [S, S, 3]: CLIP's evaluation geometry (bicubic shorter-side resize, centre
    crop, RGB). With reduced_decode a JPEG at least twice the target size is decoded at 1/2, 1/4 or 1/8
    scale by libjpeg (PIL's draft), which saves most of the decoding cost. Pixels travel as uint8 (4x less
    than float) and are normalised by the encoder, exactly as clip_core.image_transform does."""
    with Image.open(io.BytesIO(data)) as image:
        if reduced_decode and image.format == "JPEG" and min(image.size) >= 2 * image_size:
            image.draft("RGB", (image_size, image_size))
        return np.array(_geometry(image_size)(image))


@functools.cache
def _geometry(image_size: int):
    return T.Compose(clip_core.image_transform(image_size, is_train=False).transforms[:3])


def normalize_pixels(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 [B, S, S, 3] -> float [B, 3, S, S] normalised with CLIP's statistics (ToTensor + Normalize)."""
    images = pixels.permute(0, 3, 1, 2).float().div(255)
    mean = torch.tensor(clip_core.CLIP_MEAN, device=pixels.device).view(1, 3, 1, 1)
    std = torch.tensor(clip_core.CLIP_STD, device=pixels.device).view(1, 3, 1, 1)
    return images.sub(mean).div(std)


def _decoded(samples: list[dict], image_size: int, reduced_decode: bool) -> dict[str, np.ndarray]:
    return {
        "key": np.array([s["key"] for s in samples], dtype=object),
        "set": np.array([s["set"] for s in samples]),
        "label": np.array([s["label"] for s in samples]),
        "captions": np.array([json.dumps(s["captions"]) for s in samples], dtype=object),
        "pixels": np.stack([decode_image(s["image"], image_size, reduced_decode) for s in samples]),
    }


def load_work_item(
    batch: dict[str, np.ndarray], image_size: int, reduced_decode: bool, chunk: int = 64
) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data UDF over work items (a tar shard or a group of image files): read and decode them, yielding
    batches of `chunk` decoded samples, so image bytes never travel between processes."""
    torch.set_num_threads(1)
    pending: list[dict] = []
    for row in range(len(batch["set"])):
        item = {name: batch[name][row] for name in batch}
        for sample in _work_item_samples(item):
            pending.append(sample)
            if len(pending) == chunk:
                yield _decoded(pending, image_size, reduced_decode)
                pending = []
    if pending:
        yield _decoded(pending, image_size, reduced_decode)


def _work_item_samples(item: dict) -> Iterator[dict]:
    count = 0
    described = zip(json.loads(item["uris"]), json.loads(item["labels"]), json.loads(item["excluded"]))
    for uri, label, excluded in described:
        read = {"uri": uri, "label": label, "excluded": excluded}
        for sample in read_item(read, bool(item["captions_in_lines"])):
            if item["limit"] and count >= item["limit"]:
                return
            count += 1
            yield {**sample, "set": int(item["set"])}


FILES_PER_WORK_ITEM = 64


def work_items(eval_sets: list[EvalSet]) -> list[dict]:
    """One work item per tar shard or per FILES_PER_WORK_ITEM image files, tagged with its set."""
    items = []
    for i, eval_set in enumerate(eval_sets):
        singles = [item for item in eval_set.items if not item["uri"].endswith(TAR_EXT)]
        groups = [[item] for item in eval_set.items if item["uri"].endswith(TAR_EXT)]
        groups += [singles[j : j + FILES_PER_WORK_ITEM] for j in range(0, len(singles), FILES_PER_WORK_ITEM)]
        for group in groups:
            items.append(
                {
                    "uris": json.dumps([item["uri"] for item in group]),
                    "labels": json.dumps([int(item.get("label", -1)) for item in group]),
                    "excluded": json.dumps([item.get("excluded", []) for item in group]),
                    "set": i,
                    "captions_in_lines": eval_set.captions_in_lines,
                    # A file group can stop at the set's limit only as a whole: the driver trims the rest.
                    "limit": eval_set.max_samples or 0,
                }
            )
    return items


class ImageEncoder:
    """Actor-pool UDF: `pixels` -> L2-normalised image embeddings, the model loaded once per actor."""

    def __init__(self, model_name: str, weights: list, device: str = "cpu", threads: int | None = None):
        """`weights` is [state dict] or [ObjectRef of it]: the driver puts the weights in the object store
        once, and the list keeps Ray from copying them into every actor's constructor arguments."""
        import ray

        if threads:
            torch.set_num_threads(threads)
        state_dict = ray.get(weights[0]) if isinstance(weights[0], ray.ObjectRef) else weights[0]
        self.device = device
        self.model = clip_core.create_model(model_name)
        clip_core.load_checkpoint(self.model, state_dict)
        self.model.to(device).eval()

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        pixels = torch.from_numpy(np.ascontiguousarray(batch["pixels"])).to(self.device)
        embeddings = self.model.encode_image(normalize_pixels(pixels), normalize=True).float().cpu().numpy()
        return {**{k: v for k, v in batch.items() if k != "pixels"}, "embedding": embeddings}


@dataclass
class Features:
    """Image embeddings of a set in key order, with their labels (-1: none) and captions."""

    keys: list[str]
    embeddings: torch.Tensor  # [N, D] float32, L2-normalised
    labels: torch.Tensor  # [N] long
    captions: list[list[str]]

    def first(self, count: int) -> Features:
        return Features(
            self.keys[:count], self.embeddings[:count], self.labels[:count], self.captions[:count]
        )


def extract_features(
    eval_sets: list[EvalSet],
    model_name: str,
    state_dict: dict[str, torch.Tensor],
    image_size: int,
    batch_size: int = 256,
    workers: int | None = None,
    use_gpu: bool | str = "auto",
    reduced_decode: bool = False,
) -> list[Features]:
    """Run one Ray Data job over all the sets (one actor pool, the model loaded once per actor) and gather
    each set's features in the driver. Calls ray.init() when no Ray cluster is connected."""
    import ray

    if not ray.is_initialized():
        ray.init(log_to_driver=False)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    on_gpu = gpus > 0 if use_gpu == "auto" else bool(use_gpu)
    if on_gpu and gpus == 0:
        raise ValueError("use_gpu is set but the Ray cluster has no GPU; set use_gpu to auto or false.")
    items = work_items(eval_sets)
    # The encoder pool grows while there is work and room: up to `workers`, else up to one encoder per work
    # item, each taking a GPU (or a CPU) that the cluster has or gains mid-run (the autoscaler adds nodes for
    # pending encoders); it starts with one, so a pass begins as soon as one device is free.
    encoders = ray.data.ActorPoolStrategy(min_size=1, max_size=workers or max(1, len(items)))

    state_ref = ray.put(state_dict)
    # Ray Data packs a task's output into blocks of up to target_max_block_size (128 MiB) before passing
    # them on; a shard's decoded pixels would then reach the encoders only when the whole shard is done.
    # Blocks of a few chunks let the encoders start on a shard's first images while the rest decode. A
    # dataset copies the context when it is created, so the global one is restored right away.
    context = ray.data.DataContext.get_current()
    block_size = context.target_max_block_size
    context.target_max_block_size = 4 * 64 * image_size * image_size * 3
    try:
        ds = ray.data.from_items(items, override_num_blocks=len(items))
    finally:
        context.target_max_block_size = block_size
    # Reading and decoding are one task stage. Its CPU request, unlike the encoders', keeps Ray from fusing
    # it into the encoder actors, which would serialise decode and forward pass; half a core per task
    # because reading waits on storage and libjpeg is quick on small images.
    decode_cpus, encoder_cpus = 0.5, 1
    ds = ds.map_batches(
        load_work_item,
        fn_kwargs={"image_size": image_size, "reduced_decode": reduced_decode},
        batch_size=1,
        batch_format="numpy",
        num_cpus=decode_cpus,
    )
    ds = ds.map_batches(
        ImageEncoder,
        fn_constructor_kwargs={
            "model_name": model_name,
            "weights": [state_ref],
            "device": "cuda" if on_gpu else "cpu",
            "threads": None if on_gpu else 1,
        },
        batch_size=batch_size,
        batch_format="numpy",
        compute=encoders,
        num_cpus=encoder_cpus,
        num_gpus=1 if on_gpu else 0,
    )
    batches = list(ds.iter_batches(batch_size=None, batch_format="numpy"))
    gathered = [([], [], [], []) for _ in eval_sets]
    for batch in batches:
        for i, set_index in enumerate(batch["set"]):
            keys, embeddings, labels, captions = gathered[int(set_index)]
            keys.append(str(batch["key"][i]))
            embeddings.append(batch["embedding"][i : i + 1])
            labels.append(batch["label"][i : i + 1])
            captions.append(json.loads(batch["captions"][i]))
    features = [_in_key_order(*parts) for parts in gathered]
    return [f.first(s.max_samples) if s.max_samples else f for f, s in zip(features, eval_sets)]


def extract_features_locally(
    eval_set: EvalSet,
    model: torch.nn.Module,
    image_size: int,
    batch_size: int = 256,
    reduced_decode: bool = False,
) -> Features:
    """The same features in this process, without Ray (small sets, notebooks, tests)."""
    keys, embeddings, labels, captions = [], [], [], []
    pending: list[np.ndarray] = []

    def flush() -> None:
        pixels = normalize_pixels(torch.from_numpy(np.stack(pending)))
        with torch.no_grad():
            embeddings.append(model.encode_image(pixels, normalize=True).float().numpy())
        pending.clear()

    count = 0
    for item in eval_set.items:
        for sample in read_item(item, eval_set.captions_in_lines):
            if eval_set.max_samples and count >= eval_set.max_samples:
                break
            keys.append(sample["key"])
            labels.append(np.array([sample["label"]]))
            captions.append(sample["captions"])
            pending.append(decode_image(sample["image"], image_size, reduced_decode))
            count += 1
            if len(pending) == batch_size:
                flush()
    if pending:
        flush()
    return _in_key_order(keys, embeddings, labels, captions)


def _in_key_order(keys, embeddings, labels, captions) -> Features:
    if not keys:
        return Features([], torch.zeros(0, 0), torch.zeros(0, dtype=torch.long), [])
    # Ray returns batches in completion order; key order makes results independent of scheduling.
    order = sorted(range(len(keys)), key=keys.__getitem__)
    all_embeddings = torch.from_numpy(np.concatenate(embeddings))[order]
    all_labels = torch.from_numpy(np.concatenate(labels).astype(np.int64))[order]
    return Features([keys[i] for i in order], all_embeddings, all_labels, [captions[i] for i in order])
