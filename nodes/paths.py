"""Where named files live, resolved as ComfyUI's folder_paths does.

`ckpt_name: v1-5-pruned-emaonly.safetensors` means models/checkpoints/v1-5-pruned-emaonly.safetensors;
a name may carry subfolders (`sd15/dreamy.safetensors`). sdgraph also accepts an absolute path, or a
path relative to the current folder. A missing file is an error that lists what the folder holds.
These functions are the nodes' `reads_files` resolvers, so the engine fingerprints what they return.
"""

from __future__ import annotations

import re
from pathlib import Path

from graph import Folders

MODEL_EXTENSIONS = (".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")

# ComfyUI's LoadImage may name a file as "name.png [input]" / "[output]" / "[temp]".
_ANNOTATION = re.compile(r"\s*\[(input|output|temp)\]$")


def checkpoints_dir(folders: Folders) -> Path:
    return Path(folders.models_dir) / "checkpoints"


def loras_dir(folders: Folders) -> Path:
    return Path(folders.models_dir) / "loras"


def available(folder: Path, extensions: tuple[str, ...]) -> list[str]:
    """Names (with subfolders, '/'-separated) of the files in `folder` that have one of `extensions`."""
    if not folder.is_dir():
        return []
    names = [p.relative_to(folder).as_posix() for p in folder.rglob("*")
             if p.is_file() and p.suffix.lower() in extensions and not p.name.startswith(".")]
    return sorted(names)


def resolve(name: str, folder: Path, kind: str, extensions: tuple[str, ...], flag: str) -> Path:
    """The file `name` names: inside `folder`, else an absolute or current-folder-relative path."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"{kind} name is empty; give a file name from {folder}")
    candidates = [Path(name)] if Path(name).is_absolute() else [folder / name, Path(name)]
    if "\\" in name:  # a workflow from ComfyUI on Windows: "sd15\\model.safetensors"
        candidates.append(folder / name.replace("\\", "/"))
    for path in candidates:
        if path.is_file():
            return path
    names = available(folder, extensions)
    if names:
        shown = ", ".join(names[:15]) + (f", ... ({len(names)} in all)" if len(names) > 15 else "")
        listing = f"available there: {shown}"
    elif folder.is_dir():
        listing = f"{folder} holds no {kind} files"
    else:
        listing = f"the folder {folder} does not exist"
    raise FileNotFoundError(f"{kind} '{name}' not found in {folder} ({listing}); put the file there, "
                            f"give its full path, or point {flag} at the folder that holds it")


def resolve_checkpoint(name: str, folders: Folders) -> Path:
    return resolve(name, checkpoints_dir(folders), "checkpoint", MODEL_EXTENSIONS, "--models-dir")


def resolve_lora(name: str, folders: Folders) -> Path:
    return resolve(name, loras_dir(folders), "LoRA", MODEL_EXTENSIONS, "--models-dir")


def resolve_image(name: str, folders: Folders) -> Path:
    folder, flag = Path(folders.input_dir), "--input-dir"
    match = _ANNOTATION.search(name) if isinstance(name, str) else None
    if match:
        name = name[:match.start()]
        if match.group(1) == "output":
            folder, flag = Path(folders.output_dir), "--output-dir"
    return resolve(name, folder, "image", IMAGE_EXTENSIONS, flag)
