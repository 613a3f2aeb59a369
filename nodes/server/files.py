"""The served folders (output, input, temp) and the one check every client-named path goes through: a
relative name inside its folder, after following symlinks; never `..`, an absolute path or a NUL byte.
Uploads are bounded in bytes and in pixels, checked from the image header before anything is written."""

from __future__ import annotations

import io
import os
import re
from pathlib import Path

from graph.context import atomic_path

FOLDER_TYPES = ("output", "input", "temp")
MAX_PART = 255


class PathRefused(ValueError):
    pass


def safe_path(root: Path, subfolder: str, filename: str) -> Path:
    """`root/subfolder/filename`, refused (PathRefused) unless it stays inside `root` once resolved."""
    for part in (subfolder, filename):
        if not isinstance(part, str) or "\x00" in part or "\\" in part:
            raise PathRefused("a path may not hold a NUL byte or a backslash")
        if part.startswith(("/", "~")) or re.match(r"^[A-Za-z]:", part):
            raise PathRefused("a path must be relative to its folder")
        if any(p == ".." or len(p.encode()) > MAX_PART for p in part.split("/")):
            raise PathRefused("a path may not leave its folder ('..') or hold over-long names")
    if not filename or filename in (".",) or filename.endswith("/"):
        raise PathRefused("no file name given")
    base = Path(root).resolve()
    target = (base / subfolder / filename).resolve()
    if base not in target.parents:
        raise PathRefused("the path leads outside its folder")
    return target


def unique_name(folder: Path, name: str) -> str:
    """ComfyUI's rule for an upload whose name is taken: `name (1).png`, `name (2).png`, ..."""
    stem, ext = os.path.splitext(name)
    n, candidate = 1, name
    while (folder / candidate).exists():
        candidate, n = f"{stem} ({n}){ext}", n + 1
    return candidate


def check_image(data: bytes, max_pixels: int):
    """The decoded-to-header PIL image of an upload; ValueError if it is no image or too many pixels."""
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(data))
        width, height = img.size
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as e:
        raise ValueError(f"not a readable image ({type(e).__name__})") from e
    if width * height > max_pixels:
        raise ValueError(f"image is {width}x{height}: over the limit of {max_pixels} pixels")
    return img


def write_upload(folder: Path, subfolder: str, name: str, data: bytes, overwrite: bool) -> tuple[str, str]:
    """Write an upload atomically inside `folder`; (file name used, subfolder)."""
    name = os.path.basename(name.replace("\\", "/"))
    target = safe_path(folder, subfolder, name)
    target.parent.mkdir(parents=True, exist_ok=True)
    if not overwrite and target.exists():
        target = safe_path(folder, subfolder, unique_name(target.parent, target.name))
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)
    return target.name, subfolder


def masked_png(original: Path, mask_data: bytes, max_pixels: int) -> bytes:
    """ComfyUI's /upload/mask: the original image with the mask's alpha channel put in as its alpha."""
    from PIL import Image

    mask = check_image(mask_data, max_pixels)
    with open(original, "rb") as f:
        base = check_image(f.read(), max_pixels)
    base.load()
    alpha = mask.convert("RGBA").getchannel("A")
    if alpha.size != base.size:
        alpha = alpha.resize(base.size, Image.Resampling.LANCZOS)
    out = base.convert("RGBA")
    out.putalpha(alpha)
    buf = io.BytesIO()
    out.save(buf, "PNG")
    return buf.getvalue()
