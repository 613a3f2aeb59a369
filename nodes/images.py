"""LoadImage, SaveImage (PNG files with the workflow embedded) and PreviewImage."""

from __future__ import annotations

import io
import re
from pathlib import Path

import mlx.core as mx
import numpy as np

from graph import IMAGE, MASK, String, node
from nodes.paths import check_name, check_writable_folder, os_error_message, resolve_image
from nodes.prefix_tokens import expand_prefix

MAX_NAME_TRIES = 1000  # "next free file name" attempts before giving up (other writers racing us)

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


def next_counter(folder: Path, name: str, suffix: str = ".png") -> int:
    """One past the highest counter of existing `{name}_{counter:05}_{suffix}` files (1 when none)."""
    pattern = re.compile(re.escape(name) + r"_(\d+)_" + re.escape(suffix) + "$")
    counters = [int(m.group(1)) for p in folder.glob(f"*{suffix}") if (m := pattern.fullmatch(p.name))]
    return max(counters, default=0) + 1


def save_exclusive(ctx, folder: Path, name: str, data: bytes, suffix: str = ".png") -> Path:
    """Write `data` as the next free `{name}_{counter:05}_{suffix}` through the engine's atomic, never-
    overwriting `ctx.output_file` (another process taking the name first just moves us on one).
    Bounded: a folder that is a file, or any other file-system error, is one clear OSError."""
    fix = "point --output-dir (or filename_prefix) at a folder you may write in"
    try:
        check_writable_folder(folder, "output folder", "--output-dir")
        counter = next_counter(folder, name, suffix) if folder.is_dir() else 1
    except (ValueError, OSError) as e:
        raise OSError(str(e) if isinstance(e, ValueError) else os_error_message(e, folder, fix)) from None
    for _ in range(MAX_NAME_TRIES):
        target = folder / f"{name}_{counter:05}_{suffix}"
        try:
            with ctx.output_file(target, overwrite=False) as tmp:
                tmp.write_bytes(data)
            return target
        except FileExistsError:
            if not folder.is_dir():  # the folder itself is in the way, not a taken name
                raise OSError(f"cannot write {target}: {folder} is not a folder; {fix}") from None
            counter += 1
        except OSError as e:
            raise OSError(os_error_message(e, target, fix)) from None
    raise OSError(f"no free file name for {folder / name}_NNNNN_{suffix} after {MAX_NAME_TRIES} tries "
                  "(another program keeps taking them); use another filename_prefix")


def output_location(output_dir: Path, prefix: str) -> tuple[Path, str]:
    """(folder, file name stem) for a prefix that may hold subfolders; never outside output_dir."""
    check_name(prefix, "filename_prefix", writing=True)
    root = Path(output_dir).resolve()
    folder = (root / prefix).parent.resolve()
    name = Path(prefix).name
    if not name or (folder != root and root not in folder.parents):
        raise ValueError(f"filename_prefix {prefix!r} would save outside the output folder {root}; "
                         "use a name or a subfolder inside it")
    return folder, name


def save_folder(prefix: str, folders) -> Path:
    """SaveImage's `writes_files` check, before anything runs: the folder the prefix saves into is
    inside the output folder, and both are (or can become) folders this user may write in."""
    folder, _ = output_location(folders.output_dir, prefix)
    check_writable_folder(Path(folders.output_dir), "output folder", "--output-dir")
    check_writable_folder(folder, f"output folder of filename_prefix {prefix!r}", "filename_prefix")
    return folder


@node(category="image", output=True, writes_files={"filename_prefix": save_folder})
def SaveImage(images: IMAGE, filename_prefix: String() = "sdgraph", ctx=None):
    """Save images as output/{prefix}_{counter:05}_.png (never overwriting). Each PNG embeds the
    workflow (`sdgraph run image.png` re-runs it) and a ComfyUI-style `prompt` chunk.

    The prefix may hold ComfyUI's tokens: %date:yyyy-MM-dd%, %Node.input% (a node id or type, e.g.
    %KSampler.seed%), %width%, %height%, %year% ... (nodes/prefix_tokens.py)."""
    from graph.distributed import tagged_stem
    from nodes.png_workflow import png_text

    # ComfyUI's %date:...%, %Node.input%, %width% tokens, then the same checks as any prefix
    prefix = expand_prefix(filename_prefix, ctx.run_info.get("workflow"), images.shape[2], images.shape[1])
    folder, name = output_location(ctx.output_dir, prefix)
    name = tagged_stem(name, ctx.run_info)  # distributed sweeps: the variation id, whatever the rank
    text = png_text(ctx.run_info)
    batch = np.array(images.astype(mx.float32))
    for i in range(batch.shape[0]):
        ctx.check_cancelled()
        save_exclusive(ctx, folder, name, to_png_bytes(batch[i], text))


def preview_dir() -> Path:
    """Where PreviewImage writes: a `sdgraph-previews` folder in the system's temp folder (TMPDIR), never
    the output folder (ComfyUI's previews go to its temp/ folder too)."""
    import tempfile

    return Path(tempfile.gettempdir()) / "sdgraph-previews"


@node(category="image", output=True, cache="never")
def PreviewImage(images: IMAGE, ctx=None):
    """Show images without saving them: ComfyUI's PreviewImage. sdgraph writes them as PNGs to a temp
    folder ($TMPDIR/sdgraph-previews, never the output folder) and logs each path; they are not outputs
    of the run. Never an error: if that folder cannot be written, the previews are skipped with a note."""
    from graph import atomic_path

    folder = preview_dir()
    batch = np.array(images.astype(mx.float32))
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", ctx.node_id)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        counter = next_counter(folder, stem)
        for i in range(batch.shape[0]):
            ctx.check_cancelled()
            target = folder / f"{stem}_{counter + i:05}_.png"
            with atomic_path(target) as tmp:
                tmp.write_bytes(to_png_bytes(batch[i], {}))
            ctx.log(f"preview: {target}")
    except (OSError, ValueError) as e:
        ctx.log(f"previews skipped ({folder} cannot be written: {e})")
