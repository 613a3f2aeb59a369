"""Cache keys: a hash of a node's signature, never of its id or of runtime values.

key = sha256(type, version, literal inputs, upstream (key, output index) per linked input,
             fingerprints of files read)
Keys are computed for the whole plan before anything runs, which is what lets the executor skip
nodes whose every consumer is already cached.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from typing import Any

KEY_FORMAT = 1  # bump to invalidate every cache entry when this recipe changes


def node_key(
    type_name: str,
    version: int,
    literals: dict[str, Any],
    upstream: dict[str, tuple[str, int]],
    files: dict[str, str],
    volatile: bool = False,
) -> str:
    recipe = {
        "format": KEY_FORMAT,
        "type": type_name,
        "version": version,
        "literals": literals,
        "links": {name: [key, index] for name, (key, index) in upstream.items()},
        "files": files,
    }
    if volatile:
        recipe["nonce"] = uuid.uuid4().hex  # never equal to an earlier run's key
    blob = json.dumps(recipe, sort_keys=True, separators=(",", ":"), default=_fallback)
    return hashlib.sha256(blob.encode()).hexdigest()


def _fallback(value: Any) -> str:
    # Literals are JSON scalars or lists after validation; anything else is keyed by its repr.
    return repr(value)
