"""Where named files live, resolved as ComfyUI's folder_paths does.

`ckpt_name: v1-5-pruned-emaonly.safetensors` means models/checkpoints/v1-5-pruned-emaonly.safetensors;
a name may carry subfolders (`sd15/dreamy.safetensors`). sdgraph also accepts an absolute path, or a
path relative to the current folder. A missing file is an error that lists what the folder holds.
These functions are the nodes' `reads_files` resolvers, so the engine fingerprints what they return.
"""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path

from graph import Folders

MODEL_EXTENSIONS = (".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")

NAME_MAX = 255    # bytes per path component on the usual file systems (ext4, APFS, NTFS, btrfs)
PATH_MAX = 4096   # bytes of a whole path (Linux); macOS allows 1024, checked by the OS itself
# Reserved on Windows whatever the extension (a workflow that writes `con.png` fails there)
_RESERVED = {"CON", "PRN", "AUX", "NUL"} | {f"{p}{i}" for p in ("COM", "LPT") for i in range(1, 10)}

# ComfyUI's LoadImage may name a file as "name.png [input]" / "[output]" / "[temp]".
_ANNOTATION = re.compile(r"\s*\[(input|output|temp)\]$")


def _input_folder(name: str, folders: Folders) -> tuple[str, Path, str]:
    """(name without its annotation, folder, flag to change it): the input folder, or the output folder for
    a name ending in " [output]"."""
    folder, flag = Path(folders.input_dir), "--input-dir"
    match = _ANNOTATION.search(name) if isinstance(name, str) else None
    if match:
        name = name[:match.start()]
        if match.group(1) == "output":
            folder, flag = Path(folders.output_dir), "--output-dir"
    return name, folder, flag


def checkpoints_dir(folders: Folders) -> Path:
    return Path(folders.models_dir) / "checkpoints"


def loras_dir(folders: Folders) -> Path:
    return Path(folders.models_dir) / "loras"


def embeddings_dir(folders: Folders) -> Path:
    return Path(folders.models_dir) / "embeddings"


def available(folder: Path, extensions: tuple[str, ...]) -> list[str]:
    """Names (with subfolders, '/'-separated) of the files in `folder` that have one of `extensions`."""
    if not folder.is_dir():
        return []
    names = [p.relative_to(folder).as_posix() for p in folder.rglob("*")
             if p.is_file() and p.suffix.lower() in extensions and not p.name.startswith(".")]
    return sorted(names)


def check_name(name: object, kind: str, writing: bool = False) -> str:
    """The one check of a user-supplied file name (loaders' files, sinks' prefixes), before any file-
    system call: a non-empty string, no NUL byte, no component longer than NAME_MAX bytes, not longer
    than PATH_MAX bytes, and for names that will be written, no name Windows reserves. Raises
    ValueError with a message that says what to change."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"{kind} is empty; give a file name")
    shown = name if len(name) <= 60 else f"{name[:40]}...{name[-12:]}"
    if "\x00" in name:
        raise ValueError(f"{kind} {shown!r} contains a NUL byte, which no file name may hold; remove it")
    size = len(name.encode("utf-8", "surrogateescape"))
    if size > PATH_MAX:
        raise ValueError(f"{kind} {shown!r} is {size} bytes long; paths may be at most {PATH_MAX} bytes")
    for part in re.split(r"[/\\]", name):
        part_size = len(part.encode("utf-8", "surrogateescape"))
        if part_size > NAME_MAX:
            raise ValueError(f"{kind} {shown!r} has a name of {part_size} bytes; file systems allow at most "
                             f"{NAME_MAX} bytes per file or folder name; shorten it")
        if writing and part.split(".")[0].strip().upper() in _RESERVED:
            raise ValueError(f"{kind} {shown!r} uses {part!r}, a name Windows reserves for a device; "
                             "pick another name")
    return name


def check_writable_folder(folder: Path, what: str, flag: str) -> None:
    """Raise ValueError unless `folder` is (or can be created as) a folder this process may write in:
    every existing part of the path a folder, the deepest existing one writable."""
    path = Path(folder).absolute()
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{what} {path} cannot be a folder: {existing} is a file, not a folder; "
                         f"point {flag} at a folder, or move that file away")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {path} is not writable ({existing} does not allow this user to write); "
                         f"point {flag} at a folder you may write in, or change its permissions")


def os_error_message(e: OSError, path: Path | str, fix: str) -> str:
    """One line for a file-system error on `path`: what happened and what to do."""
    reason = {errno.ENAMETOOLONG: "the name is too long for the file system",
              errno.ENOSPC: "the disk is full", errno.EROFS: "the file system is read-only",
              errno.EACCES: "permission denied", errno.EPERM: "permission denied",
              errno.ENOTDIR: "a part of the path is a file, not a folder",
              errno.EEXIST: "a file is in the way of a folder",
              errno.EDQUOT: "the disk quota is exceeded"}.get(e.errno, e.strerror or str(e))
    return f"cannot write {path}: {reason}; {fix}"


def resolve(name: str, folder: Path, kind: str, extensions: tuple[str, ...], flag: str) -> Path:
    """The file `name` names: inside `folder`, else an absolute or current-folder-relative path."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"{kind} name is empty; give a file name from {folder}")
    check_name(name, f"{kind} name")
    candidates = [Path(name)] if Path(name).is_absolute() else [folder / name, Path(name)]
    if "\\" in name:  # a workflow from ComfyUI on Windows: "sd15\\model.safetensors"
        candidates.append(folder / name.replace("\\", "/"))
    for path in candidates:
        try:
            if path.is_file():
                return path
        except OSError as e:  # e.g. ENAMETOOLONG once joined with a long folder
            raise ValueError(f"{kind} '{name}' cannot be looked up in {path.parent}: {e.strerror}") from e
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


def checkpoint_files(name: str, folders: Folders) -> Path | list[Path]:
    """The checkpoint, or [checkpoint, its companion .yaml] when there is one (it can make the model
    v-prediction): LoadCheckpoint's reads_files resolver, so adding or editing the .yaml changes the cache
    key (and a checkpoint without one keeps the key it always had)."""
    from sd.loading.prediction import companion_config

    path = resolve_checkpoint(name, folders)
    config = companion_config(path)
    return path if config is None else [path, config]


def resolve_lora(name: str, folders: Folders) -> Path:
    return resolve(name, loras_dir(folders), "LoRA", MODEL_EXTENSIONS, "--models-dir")


def resolve_vae(name: str, folders: Folders) -> Path:
    return resolve(name, Path(folders.models_dir) / "vae", "VAE", MODEL_EXTENSIONS, "--models-dir")


def resolve_config(name: str, folders: Folders) -> Path:
    return resolve(name, Path(folders.models_dir) / "configs", "config", (".yaml", ".yml"), "--models-dir")


def resolve_latent(name: str, folders: Folders) -> Path:
    """A `.latent` file in the input folder (ComfyUI's LoadLatent), with LoadImage's `[input]`/`[output]`
    annotations."""
    name, folder, flag = _input_folder(name, folders)
    return resolve(name, folder, "latent", (".latent",), flag)


def upscale_models_dir(folders: Folders) -> Path:
    return Path(folders.models_dir) / "upscale_models"


def resolve_upscale_model(name: str, folders: Folders) -> Path:
    return resolve(name, upscale_models_dir(folders), "upscale model", MODEL_EXTENSIONS, "--models-dir")


def controlnet_dir(folders: Folders) -> Path:
    return Path(folders.models_dir) / "controlnet"


def resolve_controlnet(name: str, folders: Folders) -> Path:
    return resolve(name, controlnet_dir(folders), "ControlNet", MODEL_EXTENSIONS, "--models-dir")


def hypernetworks_dir(folders: Folders) -> Path:
    return Path(folders.models_dir) / "hypernetworks"


def resolve_hypernetwork(name: str, folders: Folders) -> Path:
    return resolve(name, hypernetworks_dir(folders), "hypernetwork", MODEL_EXTENSIONS, "--models-dir")


def resolve_image(name: str, folders: Folders) -> Path:
    name, folder, flag = _input_folder(name, folders)
    return resolve(name, folder, "image", IMAGE_EXTENSIONS, flag)


def find_embedding(name: str, folders: Folders) -> Path | None:
    """The file `embedding:name` means (models/embeddings, subfolders searched too, extension optional)."""
    from sd.text.embeddings import find_embedding as find

    return find(name, embeddings_dir(folders))


def prompt_embedding_files(text: str, folders: Folders) -> list[Path]:
    """The embedding files a prompt names, in order: CLIPEncode's reads_files resolver for `text`, so an
    embedding's content is part of the encoding's cache key. A name that is not there is a validation error
    naming the prompt, the name and what the folder holds. (ComfyUI warns and drops the word instead; an
    error here because a misspelt negative embedding would otherwise change every image unnoticed.)"""
    from sd.text.embeddings import EMBEDDING_EXTENSIONS
    from sd.text.prompt_weights import EMBEDDING_PREFIX, PromptError, embedding_reference, prompt_pieces

    if not isinstance(text, str) or EMBEDDING_PREFIX not in text:
        return []
    files: list[Path] = []
    try:
        for piece, _ in prompt_pieces(text):
            if piece.startswith(EMBEDDING_PREFIX):
                path, name, _ = embedding_reference(piece, lambda n: find_embedding(n, folders))
                if path is None:
                    raise FileNotFoundError(_missing_embedding(text, name, folders, EMBEDDING_EXTENSIONS))
                files.append(path)
    except PromptError as e:
        raise ValueError(str(e)) from e
    return list(dict.fromkeys(files))


def _missing_embedding(text: str, name: str, folders: Folders, extensions: tuple[str, ...]) -> str:
    folder = embeddings_dir(folders)
    names = available(folder, extensions)
    if names:
        shown = ", ".join(names[:15]) + (f", ... ({len(names)} in all)" if len(names) > 15 else "")
        listing = f"available there: {shown}"
    elif folder.is_dir():
        listing = f"{folder} holds no embeddings"
    else:
        listing = f"the folder {folder} does not exist"
    prompt = text if len(text) <= 60 else text[:57] + "..."
    return (f"prompt {prompt!r} names embedding:{name}, which is not in {folder} ({listing}); put the file "
            "there (.safetensors, .pt or .bin), fix the name, or point --models-dir at the folder above "
            "embeddings/")
