"""LoadImage and SaveImage (PNG files with the workflow embedded)."""

from __future__ import annotations

import io
import re
from pathlib import Path

import mlx.core as mx
import numpy as np

from graph import IMAGE, MASK, String, node
from nodes.paths import resolve_image

MAX_IMAGE_SIDE = 16384  # as nodes.latents.MAX_RESOLUTION; the plan's memory estimate bounds the rest


def image_header(path: Path) -> tuple[tuple[int, int], int]:
    """((width, height), frames) from the file's header, nothing decoded; ValueError for a file that is
    not an image or claims more than MAX_IMAGE_SIDE pixels a side."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            size, frames = img.size, int(getattr(img, "n_frames", 1) or 1)
    except Image.DecompressionBombError as e:
        raise ValueError(f"image '{Path(path).name}' is too large to decode ({e})") from e
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"cannot read image '{Path(path).name}': {e}") from e
    if max(size) > MAX_IMAGE_SIDE:
        raise ValueError(f"image '{Path(path).name}' is {size[0]}x{size[1]} pixels; at most {MAX_IMAGE_SIDE} "
                         "a side")
    return size, frames


@node(category="image", outputs=(IMAGE, MASK), reads_files={"image": resolve_image})
def LoadImage(image: String(), ctx=None):
    """Load an image from the input folder: IMAGE (RGB in [0, 1]) and MASK (1 - alpha; all 0 without
    alpha). Frames of an animated file become a batch."""
    from PIL import Image, ImageOps, ImageSequence

    path = resolve_image(image, ctx.folders)
    image_header(path)  # the size the file claims, checked before anything is decoded
    images, masks = [], []
    with Image.open(path) as img:
        size = None
        for frame in ImageSequence.Iterator(img):
            frame = ImageOps.exif_transpose(frame)
            if frame.mode == "I":  # 16-bit greyscale PNGs
                frame = frame.point(lambda v: v * (1 / 255))
            if frame.mode == "P" and "transparency" in frame.info:
                frame = frame.convert("RGBA")
            size = size or frame.size
            if frame.size != size:
                break  # frames of another size cannot share a batch (ComfyUI stops there too)
            images.append(np.asarray(frame.convert("RGB"), dtype=np.float32) / 255.0)
            if "A" in frame.getbands():
                masks.append(1.0 - np.asarray(frame.getchannel("A"), dtype=np.float32) / 255.0)
            else:
                masks.append(np.zeros((64, 64), dtype=np.float32))
    if len({m.shape for m in masks}) > 1:
        masks = [np.zeros((64, 64), dtype=np.float32)] * len(masks)
    return mx.array(np.stack(images)), mx.array(np.stack(masks))


def to_png_bytes(pixels: np.ndarray, text: dict[str, str]) -> bytes:
    """One image [H, W, 3] in [0, 1] as PNG bytes with text chunks (deterministic for equal input)."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in text.items():
        info.add_text(key, value)
    array = np.clip(255.0 * pixels, 0, 255).astype(np.uint8)  # truncation, as ComfyUI's SaveImage
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG", pnginfo=info, compress_level=4)
    return buf.getvalue()


def next_counter(folder: Path, name: str) -> int:
    """One past the highest counter of existing `{name}_{counter:05}_.png` files (1 when none)."""
    pattern = re.compile(re.escape(name) + r"_(\d+)_\.png$")
    counters = [int(m.group(1)) for p in folder.glob("*.png") if (m := pattern.fullmatch(p.name))]
    return max(counters, default=0) + 1


def save_exclusive(ctx, folder: Path, name: str, data: bytes) -> Path:
    """Write `data` as the next free `{name}_{counter:05}_.png` through the engine's atomic, never-
    overwriting `ctx.output_file` (another process taking the name first just moves us on one)."""
    counter = next_counter(folder, name) if folder.is_dir() else 1
    while True:
        target = folder / f"{name}_{counter:05}_.png"
        try:
            with ctx.output_file(target, overwrite=False) as tmp:
                tmp.write_bytes(data)
            return target
        except FileExistsError:
            counter += 1


def output_location(output_dir: Path, prefix: str) -> tuple[Path, str]:
    """(folder, file name stem) for a prefix that may hold subfolders; never outside output_dir."""
    root = Path(output_dir).resolve()
    folder = (root / prefix).parent.resolve()
    name = Path(prefix).name
    if not name or (folder != root and root not in folder.parents):
        raise ValueError(f"filename_prefix {prefix!r} would save outside the output folder {root}; "
                         "use a name or a subfolder inside it")
    return folder, name


@node(category="image", output=True)
def SaveImage(images: IMAGE, filename_prefix: String() = "sdgraph", ctx=None):
    """Save images as output/{prefix}_{counter:05}_.png (never overwriting). Each PNG embeds the
    workflow (`sdgraph run image.png` re-runs it) and a ComfyUI-style `prompt` chunk."""
    from graph.distributed import tagged_stem
    from nodes.png_workflow import png_text

    folder, name = output_location(ctx.output_dir, filename_prefix)
    name = tagged_stem(name, ctx.run_info)  # distributed sweeps: the variation id, whatever the rank
    text = png_text(ctx.run_info)
    batch = np.array(images.astype(mx.float32))
    for i in range(batch.shape[0]):
        ctx.check_cancelled()
        save_exclusive(ctx, folder, name, to_png_bytes(batch[i], text))
