"""The embedded default source: digits 0-9 rendered from the TrueType fonts matplotlib ships.

Each image is a pure function of (seed, index): its own RNG, so rendering order, worker
count and N do not change image ``i``. White ink on black like sklearn's digits, with
random size, aspect, shift, rotation, stroke width, blur and noise; about half the
images are degraded to the target's look (8x8 block counts, 17 grey levels, upscaled
back with the same resampling the target uses): that bridge is what lets features
learned here transfer to the 8x8 handwritten digits.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import current_process, get_all_start_methods, get_context
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from transfer.data.digits import LEVELS, levels_to_image
from transfer.data.images import png_bytes
from transfer.data.manifest import ManifestRow, generated_row
from transfer.data.progress import progress_bar
from transfer.errors import DataError

DIGITS = "0123456789"
GLYPH_PX = 64  # glyphs are drawn large, then shrunk (antialiased) to the image size
DEGRADE_P = 0.5
LOW_RES = 8
_BINARY = [255 if v >= 128 else 0 for v in range(256)]  # threshold lookup table


def font_dir() -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


@functools.lru_cache(maxsize=None)
def _font(path: str, size: int = GLYPH_PX) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, size)


def _draw_glyph(path: str, char: str, stroke: int = 0) -> Image.Image:
    """The glyph on a black canvas, ink = 255, centred."""
    canvas = Image.new("L", (GLYPH_PX * 2, GLYPH_PX * 2), 0)
    ImageDraw.Draw(canvas).text(
        (GLYPH_PX, GLYPH_PX), char, fill=255, font=_font(path), anchor="mm",
        stroke_width=stroke, stroke_fill=255,
    )
    return canvas


def _signature(path: Path) -> np.ndarray | None:
    """(10, 192) unit vectors of the cropped digit glyphs, or None if one is blank."""
    out = []
    for char in DIGITS:
        glyph = _draw_glyph(str(path), char)
        box = glyph.getbbox()
        if box is None:
            return None
        vec = np.asarray(glyph.crop(box).resize((12, 16), Image.Resampling.BILINEAR), float)
        vec = vec.ravel() - vec.mean()
        out.append(vec / (np.linalg.norm(vec) + 1e-9))
    return np.stack(out)


REFERENCE_FONTS = ("DejaVuSans.ttf", "DejaVuSerif.ttf")


@functools.lru_cache(maxsize=4)
def digit_fonts(directory: str | None = None) -> tuple[str, ...]:
    """Fonts whose 0-9 glyphs really are digits.

    Skips fonts with blank digits (display/size-variant fonts), with one shared glyph
    for all ten (notdef boxes, LastResort), and symbol fonts that map '0'-'9' to other
    shapes (cmex10, cmsy10): at least half the digits must be recognised by nearest
    neighbour against the DejaVu reference glyphs.
    """
    root = Path(directory) if directory else font_dir()
    refs = [s for name in REFERENCE_FONTS if (s := _signature(root / name)) is not None]
    keep = []
    for path in sorted(root.glob("*.ttf")):
        try:
            sig = _signature(path)
        except OSError:
            continue
        if sig is None or len({v.tobytes() for v in sig}) < len(DIGITS):
            continue
        if refs:
            similarity = np.max([sig @ ref.T for ref in refs], axis=0)  # (10, 10)
            if (similarity.argmax(axis=1) == np.arange(10)).sum() < 5:
                continue
        keep.append(str(path))
    if not keep:
        raise DataError(f"no TrueType font in {root} renders the digits 0-9")
    return tuple(keep)


def _fit_glyph(
    glyph: Image.Image, rng: np.random.Generator, size: int, height: tuple[float, float],
    shift: float,
) -> Image.Image:
    """Crop to the ink, scale to a random height/aspect, paste at a random offset.

    ``height``: glyph height range as a fraction of ``size``; ``shift``: extra random
    offset (fraction of ``size``) beyond the free margin, so strokes may clip at borders.
    """
    box = glyph.getbbox()
    glyph = glyph.crop(box) if box else glyph
    h = max(2, round(rng.uniform(*height) * size))
    aspect = glyph.width / glyph.height * rng.uniform(0.8, 1.25)
    w = max(1, min(size, round(h * aspect)))
    glyph = glyph.resize((w, h), Image.Resampling.LANCZOS)
    frame = Image.new("L", (size, size), 0)
    slack_x, slack_y = size - w, size - h
    x = round(slack_x / 2 + rng.uniform(-0.5, 0.5) * (slack_x + shift * size))
    y = round(slack_y / 2 + rng.uniform(-0.5, 0.5) * (slack_y + shift * size))
    frame.paste(glyph, (int(x), int(y)))
    return frame


def _degrade(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Target look: (binarise,) 8x8 block average, 17 grey levels, upsample back."""
    if rng.random() < 0.7:  # optdigits counted the inked pixels of binary bitmaps
        image = image.point(_BINARY)
    small = np.asarray(image.resize((LOW_RES, LOW_RES), Image.Resampling.BOX), float)
    return levels_to_image(np.round(small / 255.0 * LEVELS), image.width)


def render_digit(digit: int, size: int, seed: int, index: int, fonts: Sequence[str]) -> np.ndarray:
    """One synthetic digit, uint8 (size, size), ink = high values; a pure function of
    (seed, index)."""
    rng = np.random.default_rng([seed, index])
    degrade = rng.random() < DEGRADE_P
    path = fonts[rng.integers(len(fonts))]
    stroke = int(rng.integers(0, 4))  # extra outline at 64 px: thin .. bold
    glyph = _draw_glyph(path, DIGITS[digit], stroke)
    glyph = glyph.crop(glyph.getbbox())  # rotating the ink box only is ~4x cheaper
    glyph = glyph.rotate(rng.uniform(-15, 15), Image.Resampling.BILINEAR, expand=True)
    if degrade:  # like the target: digit spans (nearly) the full height, centred
        image = _degrade(_fit_glyph(glyph, rng, size, (0.8, 1.0), 0.05), rng)
    else:
        image = _fit_glyph(glyph, rng, size, (0.55, 1.0), 0.1)
        if rng.random() < 0.3:
            image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0) * size / 32))
    array = np.asarray(image, np.float32) * rng.uniform(0.75, 1.0)  # ink intensity
    array += rng.normal(0.0, rng.uniform(0.0, 8.0), array.shape)
    return np.clip(np.round(array), 0, 255).astype(np.uint8)


def _render_chunk(args: tuple[Path, list[int], int, int, tuple[str, ...]]) -> list[ManifestRow]:
    """Render and write a chunk of indices (runs in a worker process)."""
    dest, indices, size, seed, fonts = args
    rows = []
    for index in indices:
        digit = index % 10  # balanced classes
        data = png_bytes(Image.fromarray(render_digit(digit, size, seed, index, fonts), "L"))
        rel = f"{digit}/{index:05d}.png"
        (dest / rel).write_bytes(data)
        rows.append(generated_row(data, rel, str(digit), size))
    return rows


def _chunks(n: int, chunk: int) -> Iterator[list[int]]:
    for start in range(0, n, chunk):
        yield list(range(start, min(n, start + chunk)))


def _workers(n: int) -> int:
    if current_process().daemon:  # daemonic processes may not have children
        return 1
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(cpus or 1, 8, n // 2000))  # processes only pay off for big N


def _run(jobs: list[tuple], workers: int) -> Iterator[list[ManifestRow]]:
    """Chunk results in job order (so the output never depends on the worker count)."""
    if workers == 1:
        yield from map(_render_chunk, jobs)
        return
    # fork: workers inherit the loaded modules and font cache (no re-import of torch)
    method = "fork" if "fork" in get_all_start_methods() else "spawn"
    with ProcessPoolExecutor(workers, mp_context=get_context(method)) as pool:
        yield from pool.map(_render_chunk, jobs)


def write_font_digits(
    dest: Path, n: int, image_size: int, seed: int, progress: bool = True
) -> list[ManifestRow]:
    """Render ``n`` digits (n/10 per class) into ``dest/<digit>/<index>.png``; return rows."""
    fonts = digit_fonts()
    for digit in DIGITS:
        (dest / digit).mkdir(parents=True, exist_ok=True)
    jobs = [(dest, idx, image_size, seed, fonts) for idx in _chunks(n, 250)]
    rows: list[ManifestRow] = []
    with progress_bar(progress) as track:
        results = _run(jobs, _workers(n))
        for chunk in track(results, description="source: rendering font digits", total=len(jobs)):
            rows.extend(chunk)
    return rows
