"""The graph engine: typed node declarations, workflow files, validation, planning, cached execution.

It knows nothing about Stable Diffusion. Node authors need only:

    from graph import node, Int, Float, Choice, String, Boolean, LATENT, IMAGE, socket_type, atomic_path
"""

from graph.context import ExecutionContext, Folders, atomic_path
from graph.declare import NODE_REGISTRY, NodeSpec, get_spec, node
from graph.errors import Cancelled, GraphError, NodeFailed, Problem, ValidationFailed
from graph.types import (
    BOOLEAN,
    CLIP,
    CONDITIONING,
    FLOAT,
    IMAGE,
    INT,
    LATENT,
    MASK,
    MODEL,
    STRING,
    VAE,
    Boolean,
    Choice,
    Float,
    Int,
    SocketType,
    String,
    socket_type,
)

__all__ = [
    "BOOLEAN", "CLIP", "CONDITIONING", "FLOAT", "IMAGE", "INT", "LATENT", "MASK", "MODEL", "STRING", "VAE",
    "Boolean", "Cancelled", "Choice", "ExecutionContext", "Float", "Folders", "GraphError", "Int",
    "NODE_REGISTRY", "NodeFailed", "NodeSpec", "Problem", "SocketType", "String", "ValidationFailed",
    "atomic_path", "get_spec", "node", "socket_type",
]
