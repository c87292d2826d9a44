"""Data for the quantizer corpus: 3-channel 32x32 Fashion-MNIST, and rendered text for the OCR models.

The benchmarks (bench/corpus_models.py trains the corpus on it, bench/coverage.py and
bench/defend_speed.py calibrate and test with it) and the tests read the same builders.

- `fmnist32`: Fashion-MNIST padded to 32x32 (zeros, its own background) and repeated to
  three channels, the input the corpus classifiers are trained on;
- `text_lines`: one line of text per image, half of them turned by 180 degrees, for the
  text-direction classifier of rapidocr (`ch_ppocr_mobile_v2.0_cls_infer.onnx`; label 0
  is upright, 1 is 180 degrees, as its label_list ['0', '180'] says);
- `text_pages`: document-like pages with several lines, for the text detector
  (`ch_PP-OCRv4_det_infer.onnx`, a probability map, judged by output error);
- `paddle_input`: the rapidocr models' own preprocessing of such uint8 RGB images.

Everything is seeded: the same arguments give the same arrays (the text relies on
Pillow's bundled font, so the pixels are those of one Pillow version).
"""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pipeline.base.data import Dataset, Split, load_dataset, sample_indices

#: Per-channel normalisation of `fmnist32` images, measured on the full padded training
#: split (60,000 images; the padding lowers the mean and std of the 28x28 images).
FMNIST32_MEAN: list[float] = [0.2190] * 3
FMNIST32_STD: list[float] = [0.3318] * 3
FMNIST32_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                    "Sneaker", "Bag", "Ankle boot")

#: Real words and numbers for the rendered text (fixed, so renderings are reproducible).
WORDS: tuple[str, ...] = (
    "the", "invoice", "total", "amount", "date", "number", "customer", "address", "street",
    "order", "payment", "received", "thank", "you", "for", "your", "business", "quantity",
    "price", "description", "shipping", "account", "balance", "due", "page", "report",
    "summary", "quarterly", "results", "revenue", "profit", "market", "office", "station",
    "river", "mountain", "garden", "window", "coffee", "library", "morning", "evening",
    "platform", "ticket", "return", "single", "adult", "child", "Monday", "Friday",
    "January", "March", "October", "London", "Paris", "Berlin", "Tokyo", "Road", "Avenue",
    "Hotel", "Bank", "Ltd", "Inc", "Tel", "Fax", "Email", "Name", "Signature", "Approved",
    "No.", "Ref", "Item", "Code", "VAT", "Net", "Gross", "Subtotal", "Discount", "Cash",
    "2023", "2024", "15.00", "249.99", "1,200", "36", "7", "42", "100%", "08:30", "12/05",
    "+44", "No. 17", "3.5 kg", "A4", "Room 210", "Flight BA117", "$19.95", "EUR 80",
)
#: Fraction of the line height the font size is drawn at (cap height to descender).
_FONT_SCALE = (0.5, 0.78)


def fmnist32(split: Split, n: int | None = None, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST padded to 32x32 and repeated to three channels.

    Args:
        split: "train" or "test".
        n: Number of images, drawn without replacement by `seed` (None: the whole split
            in file order).
        seed: Seeds the choice of images.

    Returns:
        float32 images N x 3 x 32 x 32 in [0, 1] and int64 labels N.

    Raises:
        EfrapError: the data set is not installed, or `n` exceeds the split.
    """
    data = fmnist32_dataset(split, n, seed)
    return data.images, data.labels


def fmnist32_dataset(split: Split, n: int | None = None, seed: int = 0) -> Dataset:
    """`fmnist32` as a `Dataset` (what `models.train.train_classifier` takes)."""
    base = _fashion(split)
    idx = np.arange(len(base.labels)) if n is None else sample_indices(len(base.labels), n, seed)
    # Pad with zeros (the background of Fashion-MNIST) to the 32x32 of CIFAR-style models.
    images = np.pad(base.images[idx], ((0, 0), (0, 0), (2, 2), (2, 2)))
    images = np.ascontiguousarray(np.repeat(images, 3, axis=1), dtype=np.float32)
    return Dataset("fashion-mnist-32", images, base.labels[idx].copy(), 10)


@functools.lru_cache(maxsize=2)
def _fashion(split: Split) -> Dataset:
    return load_dataset("fashion-mnist", split)


@functools.lru_cache(maxsize=16)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's bundled font at `size` pixels (Pillow >= 10.1 with FreeType)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: only the small bitmap font exists
        return ImageFont.load_default()


def _colours(rng: np.random.Generator) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """A light, slightly tinted background and a dark ink."""
    base = int(rng.integers(185, 250))
    bg = tuple(int(v) for v in np.clip(base + rng.integers(-15, 16, size=3), 0, 255))
    ink = int(rng.integers(0, 70))
    fg = tuple(int(v) for v in np.clip(ink + rng.integers(-12, 13, size=3), 0, 255))
    return bg, fg


def _noisy(img: np.ndarray, rng: np.random.Generator, low: float, high: float) -> np.ndarray:
    """`img` plus Gaussian noise of a random sigma in [low, high), as uint8."""
    sigma = rng.uniform(low, high)
    noisy = img.astype(np.float32) + rng.normal(0.0, sigma, size=img.shape).astype(np.float32)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def _words(rng: np.random.Generator, count: int) -> str:
    return " ".join(WORDS[int(i)] for i in rng.integers(0, len(WORDS), size=count))


def render_line(text: str, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """One upright text line, H x W x 3 uint8 RGB.

    The text is drawn at its natural width; a line longer than `width` is squeezed to
    fit, as rapidocr's classifier resizes a wide crop to its input width, and a shorter
    one sits on the background at a small left margin.
    """
    bg, fg = _colours(rng)
    font = _font(max(6, int(height * rng.uniform(*_FONT_SCALE))))
    left, top, right, bottom = ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((0, 0), text, font=font)
    margin = int(rng.integers(2, max(3, height // 6)))
    natural = Image.new("RGB", (right - left + 2 * margin, height), bg)
    # Centre the ink box vertically, with a little jitter, as detector crops do.
    y = (height - (bottom - top)) // 2 - top + int(rng.integers(-2, 3))
    ImageDraw.Draw(natural).text((margin - left, y), text, fill=fg, font=font)
    if natural.width > width:
        line = natural.resize((width, height), Image.Resampling.BILINEAR)
    else:
        line = Image.new("RGB", (width, height), bg)
        line.paste(natural, (0, 0))
    return _noisy(np.asarray(line), rng, 2.0, 8.0)


def text_lines(n: int, seed: int = 0, height: int = 48, width: int = 192,
               rotate_fraction: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Rendered text lines, some turned by 180 degrees, for the text-direction classifier.

    Image i is drawn from its own generator (seed, i) and the rotated ones are chosen by
    a separate one, so that image i with label 1 is exactly image i of
    `text_lines(n, seed, rotate_fraction=0.0)` turned by 180 degrees.

    Args:
        n: Number of images.
        seed: Seeds the text, colours, font size, noise and which images are rotated.
        height: Image height (rapidocr's classifier takes 48).
        width: Image width (its classifier pads or squeezes crops to 192).
        rotate_fraction: Share of images turned by 180 degrees (rounded to a count).

    Returns:
        uint8 RGB images N x H x W x 3 (what rapidocr's preprocessing receives, before
        its BGR flip; see `paddle_input`) and int64 labels N: 0 upright, 1 rotated by 180
        degrees (index 1 of the classifier's label_list ['0', '180']).
    """
    if n < 0 or not 0.0 <= rotate_fraction <= 1.0:
        raise ValueError(f"need n >= 0 and rotate_fraction in [0, 1], got {n}, {rotate_fraction}")
    images = np.empty((n, height, width, 3), np.uint8)
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        images[i] = render_line(_words(rng, int(rng.integers(1, 7))), height, width, rng)
    labels = np.zeros(n, np.int64)
    rotated = np.random.default_rng([seed, n, 180]).permutation(n)[: round(n * rotate_fraction)]
    labels[rotated] = 1
    images[rotated] = images[rotated][:, ::-1, ::-1]  # 180 degrees: flip rows and columns
    return images, labels


def text_pages(n: int, seed: int = 0, size: tuple[int, int] = (320, 480)) -> np.ndarray:
    """Document-like pages with several text lines, for the text detector.

    Lines of varied font size, indent and colour on a light page, with paragraph gaps
    and noise. The default size is a multiple of 32 on both sides, as the detector
    needs (rapidocr resizes to one; feeding it directly skips that resize).

    Args:
        n: Number of pages.
        seed: Seeds everything drawn.
        size: (height, width) in pixels.

    Returns:
        uint8 RGB images N x H x W x 3.
    """
    height, width = size
    pages = np.empty((n, height, width, 3), np.uint8)
    for i in range(n):
        rng = np.random.default_rng([seed, i, 1])
        bg, fg = _colours(rng)
        page = Image.new("RGB", (width, height), bg)
        draw = ImageDraw.Draw(page)
        y = int(rng.integers(8, max(9, height // 12)))
        first = True
        while True:
            # A larger first line reads as a title; body lines vary a little in size.
            px = int(rng.integers(22, 34)) if first else int(rng.integers(12, 24))
            font = _font(px)
            if y + px * 1.3 > height - 6:
                break
            x = int(rng.integers(8, max(9, width // 8)))
            text = _words(rng, int(rng.integers(2, 10)))
            ink = fg if rng.random() < 0.85 else _colours(rng)[1]
            draw.text((x, y), text, fill=ink, font=font)
            y += int(px * rng.uniform(1.3, 1.8)) + (int(rng.integers(6, 20)) if rng.random() < 0.2 else 0)
            first = False
        pages[i] = _noisy(np.asarray(page), rng, 1.0, 6.0)
    return pages


def paddle_input(images: np.ndarray) -> np.ndarray:
    """rapidocr's preprocessing of uint8 RGB images already at the model's input size.

    The package reads files as RGB and turns them into BGR (utils/load_image.py), then
    scales by 1/255 and normalises with mean 0.5 and std 0.5 per channel
    (ch_ppocr_cls/text_cls.py resize_norm_img, ch_ppocr_det/utils.py DetPreProcess,
    ch_ppocr_rec/text_recognize.py resize_norm_img).

    Returns:
        float32 N x 3 x H x W, BGR, in [-1, 1].
    """
    bgr = images[..., ::-1].astype(np.float32) / 255.0
    return np.ascontiguousarray(((bgr - 0.5) / 0.5).transpose(0, 3, 1, 2), dtype=np.float32)
