"""Image examples, decoding, deterministic corruptions (domains) and preprocessing (PIL + torch)."""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageFilter

from fedblend.errors import DataError

CIFAR10_CLASSES = [
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
]


@dataclass(frozen=True)
class ImageExample:
    image: bytes  # encoded JPEG/PNG
    label: int
    domain: str = "none"

    @property
    def key(self) -> str:
        """Identifies the pixels a backbone sees: image bytes + corruption."""
        return hashlib.sha1(self.image + self.domain.encode()).hexdigest()

    def with_domain(self, domain: str) -> ImageExample:
        return ImageExample(self.image, self.label, domain)


def read_parquet_images(path: Path) -> list[ImageExample]:
    """Images stored the Hugging Face hub way: columns ``image`` {bytes, path} and ``label``."""
    import pyarrow.parquet as pq

    if not path.is_file():
        raise DataError(f"{path}: image parquet file not found")
    try:
        table = pq.read_table(path, columns=["image", "label"])
    except (OSError, KeyError, ValueError) as e:  # pyarrow's errors derive from these
        raise DataError(f"{path}: cannot read image parquet (need columns image, label): {e}") from None
    images = table.column("image").to_pylist()
    labels = table.column("label").to_pylist()
    out = []
    for i, (img, y) in enumerate(zip(images, labels, strict=True)):
        data = img.get("bytes") if isinstance(img, dict) else img
        if not data or y is None:
            raise DataError(f"{path}: row {i} has no image bytes or no label")
        out.append(ImageExample(bytes(data), int(y)))
    return out


def synthetic_images(n_classes: int, per_class: int, seed: int, size: int = 32) -> list[ImageExample]:
    """Tiny class-dependent images (a colour and a stripe pattern per class, plus noise)."""
    rng = np.random.default_rng(seed)
    palette = np.random.default_rng(1234).integers(30, 226, size=(n_classes, 3))
    out = []
    yy, xx = np.mgrid[0:size, 0:size]
    for c in range(n_classes):
        stripes = ((xx * (c % 3 + 1) + yy * (c // 3 + 1)) // 4) % 2
        for _ in range(per_class):
            base = palette[c][None, None, :] * (0.6 + 0.4 * stripes[..., None])
            img = np.clip(base + rng.normal(0, 18, size=(size, size, 3)), 0, 255).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="PNG")
            out.append(ImageExample(buf.getvalue(), c))
    return out


def corrupt(img: Image.Image, domain: str, key: str) -> Image.Image:
    """A deterministic corruption (noise is seeded by the example key)."""
    if domain == "none":
        return img
    if domain == "blur":
        return img.filter(ImageFilter.GaussianBlur(radius=max(1.0, img.width / 32)))
    if domain == "noise":
        rng = np.random.default_rng(int(key[:8], 16))
        a = np.asarray(img, dtype=np.float32) + rng.normal(0, 40, size=(img.height, img.width, 3))
        return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
    if domain == "contrast":
        return ImageEnhance.Contrast(img).enhance(0.35)
    if domain == "grayscale":
        return img.convert("L").convert("RGB")
    if domain == "rotation":
        return img.rotate(90)
    raise DataError(f"unknown corruption {domain!r}")


def load_image(ex: ImageExample) -> Image.Image:
    try:
        img = Image.open(io.BytesIO(ex.image)).convert("RGB")
    except (OSError, ValueError) as e:  # PIL.UnidentifiedImageError is an OSError
        raise DataError(f"image {ex.key[:12]}: cannot decode: {e}") from None
    return corrupt(img, ex.domain, ex.key)


def preprocess(ex: ImageExample, size: int, mean, std) -> torch.Tensor:
    img = load_image(ex).resize((size, size), Image.Resampling.BICUBIC)
    t = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    m = torch.tensor(mean, dtype=torch.float32)[:, None, None]
    s = torch.tensor(std, dtype=torch.float32)[:, None, None]
    return (t - m) / s


def pixels(examples, size: int, mean, std) -> torch.Tensor:
    if not examples:
        return torch.zeros(0, 3, size, size)
    return torch.stack([preprocess(e, size, mean, std) for e in examples])
