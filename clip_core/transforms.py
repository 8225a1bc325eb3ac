"""Image preprocessing for CLIP: random resized crop for training, shorter-side resize plus centre crop for
evaluation, both normalised with the statistics OpenAI's CLIP was trained with."""

from PIL import Image
from torchvision import transforms as T

# Per-channel RGB mean and std of OpenAI's CLIP training images; every released CLIP checkpoint expects them.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def convert_to_rgb(image: Image.Image) -> Image.Image:
    # A module-level function rather than a lambda so the transform pickles into Ray workers.
    return image.convert("RGB")


def image_transform(
    image_size: int,
    is_train: bool,
    mean: tuple[float, float, float] = CLIP_MEAN,
    std: tuple[float, float, float] = CLIP_STD,
    scale: tuple[float, float] = (0.9, 1.0),
) -> T.Compose:
    """PIL image of any mode -> float tensor [3, image_size, image_size].

    The RGB conversion comes after resampling, as in OpenCLIP, so RGBA images are resampled with
    premultiplied alpha by PIL and the outputs match OpenCLIP's bit for bit. Training randomness comes
    from torch's global generator: seed it with torch.manual_seed for repeatable crops.
    """
    if is_train:
        geometry = [T.RandomResizedCrop(image_size, scale=scale, interpolation=T.InterpolationMode.BICUBIC)]
    else:
        geometry = [
            T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(image_size),
        ]
    return T.Compose([*geometry, convert_to_rgb, T.ToTensor(), T.Normalize(mean=mean, std=std)])
