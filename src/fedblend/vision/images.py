"""Image examples, decoding, deterministic corruptions (domains) and preprocessing (PIL + torch)."""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, field

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
    source: str = field(default="", compare=False)  # "train.parquet row 17", for error messages

    @property
    def key(self) -> str:
        """Identifies the pixels a backbone sees: image bytes + corruption."""
        return hashlib.sha1(self.image + self.domain.encode()).hexdigest()

    def with_domain(self, domain: str) -> ImageExample:
        return ImageExample(self.image, self.label, domain, self.source)


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


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB: grayscale (L, LA, 1), palette (P, with or without transparency),
    RGBA/CMYK, and 16/32-bit or float grayscale (I;16, I, F; rescaled to 0..255)."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
        return Image.fromarray(a.astype(np.uint8), "L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # PIL warns when P with transparency goes straight to RGB
    return img.convert("RGB")


def load_image(ex: ImageExample) -> Image.Image:
    try:
        img = to_rgb(Image.open(io.BytesIO(ex.image)))
    except (OSError, ValueError) as e:  # PIL.UnidentifiedImageError is an OSError
        where = ex.source or f"image {ex.key[:12]}"
        raise DataError(f"{where}: corrupt image bytes, cannot decode: {e}") from None
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
