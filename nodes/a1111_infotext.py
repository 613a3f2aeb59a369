"""Parse A1111 / Forge / civitai "infotext": the generation settings those tools write into images (PNG
`parameters` chunk, JPEG/WebP EXIF UserComment).

    a castle on a hill, (masterpiece:1.2) <lora:detail:0.8>
    Negative prompt: blurry, lowres
    Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 42, Size: 512x768, ...

The last line holds `Key: value` pairs (a value with commas is written in double quotes, JSON-escaped);
the lines before it are the prompt, then, from a line starting `Negative prompt:`, the negative prompt.
This follows A1111's own reader (`parse_generation_parameters` in modules/infotext_utils.py).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
SIZE = re.compile(r"^(\d+)\s*x\s*(\d+)$")
NEGATIVE = "Negative prompt:"
# A1111's extra networks: <lora:name:weight>, <lora:name:te:unet>, <lora:name:te=0.5:unet=1>, <lyco:...>,
# <hypernet:...> (modules/extra_networks.py)
NETWORK = re.compile(r"<(\w+):([^>]+)>")


@dataclass
class LoraTag:
    name: str
    unet: float
    te: float


@dataclass
class Infotext:
    prompt: str
    negative: str
    params: dict[str, str]                                  # Key -> value as written (unquoted)
    loras: list[LoraTag] = field(default_factory=list)      # from the prompt, removed from its text
    other_networks: list[str] = field(default_factory=list)  # <hypernet:...> and the like, removed too


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
        try:
            return str(json.loads(value))
        except ValueError:
            return value[1:-1]
    return value


def parse_infotext(text: str) -> Infotext:
    """Split an infotext into prompt, negative prompt and settings (values unquoted, not converted)."""
    *lines, last = text.strip().replace("\r\n", "\n").split("\n")
    if len(PARAM.findall(last)) < 3:  # A1111's rule: a settings line has at least three pairs
        lines.append(last)
        last = ""
    prompt: list[str] = []
    negative: list[str] = []
    for line in lines:
        line = line.strip()
        if not negative and line.startswith(NEGATIVE):
            negative.append(line[len(NEGATIVE):].strip())
            continue
        (negative if negative else prompt).append(line)
    params: dict[str, str] = {}
    for key, value in PARAM.findall(last):
        params[key.strip()] = _unquote(value.strip())
    info = Infotext("\n".join(prompt), "\n".join(negative), params)
    info.prompt = _take_networks(info, info.prompt, keep=True)
    info.negative = _take_networks(info, info.negative, keep=False)
    return info


def _take_networks(info: Infotext, text: str, keep: bool) -> str:
    """Remove <lora:...> style tags from a prompt, as A1111 does (the tag goes, the commas around it stay:
    they are part of the prompt A1111 encodes); those of the positive prompt are kept as LoRAs."""
    def replace(m: re.Match) -> str:
        kind, args = m.group(1).lower(), m.group(2).split(":")
        if kind in ("lora", "lyco") and keep:
            info.loras.append(_lora(args[0].strip(), args[1:]))
        else:
            info.other_networks.append(m.group(0))
        return ""
    return NETWORK.sub(replace, text)


def _lora(name: str, parts: list[str]) -> LoraTag:
    """A1111's argument order: te multiplier, then unet multiplier (defaults to te); or te=/unet= names."""
    positional: list[float] = []
    named: dict[str, float] = {}
    for part in parts:
        key, sep, value = part.partition("=")
        try:
            if sep:
                named[key.strip().lower()] = float(value)
            elif part.strip():
                positional.append(float(part))
        except ValueError:
            continue  # e.g. a dyn_dim or a typo; the weight stays at its default
    te = named.get("te", positional[0] if positional else 1.0)
    unet = named.get("unet", positional[1] if len(positional) > 1 else te)
    return LoraTag(name, unet, te)


def size(value: str) -> tuple[int, int] | None:
    m = SIZE.match(value.strip())
    return (int(m.group(1)), int(m.group(2))) if m else None
