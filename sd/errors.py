"""Errors raised by the model code. Each names the file (and key) it is about, so a user can act on it."""

from __future__ import annotations


class SDGraphError(Exception):
    """Base class: every error sdgraph raises on purpose derives from this."""


class CheckpointError(SDGraphError):
    """A checkpoint or weights file could not be read, or does not fit the model."""

    def __init__(self, path: object, message: str):
        self.path = str(path)
        super().__init__(f"{self.path}: {message}")


class ArchitectureError(CheckpointError):
    """The file holds a model family sdgraph does not support (SD2.x, SDXL, ...)."""


class LoRAError(CheckpointError):
    """A LoRA file is unreadable, malformed or does not match the model."""


class MissingComponentError(SDGraphError):
    """A checkpoint lacks a part (VAE, text encoder) that a node tried to use."""


class Cancelled(SDGraphError):
    """The user cancelled a long-running operation (sampling) between two steps."""
