"""What a LoRA load applied: layers matched / present per component, and the names that did not match."""

from __future__ import annotations

from dataclasses import dataclass

_LABELS = {"unet": "unet", "text_encoder": "text encoder"}


@dataclass(frozen=True)
class ComponentCoverage:
    """One component's matching result. `unmatched` names the LoRA layers (file spelling) left unapplied."""

    component: str
    matched: int
    present: int
    unmatched: tuple[str, ...] = ()

    @property
    def complete(self) -> bool:
        return self.matched == self.present

    def __str__(self) -> str:
        return f"{_LABELS.get(self.component, self.component)} {self.matched}/{self.present}"


@dataclass(frozen=True)
class CoverageReport:
    """Per-component coverage of one LoRA file, e.g. `unet 192/192, text encoder 72/72`."""

    path: str
    components: tuple[ComponentCoverage, ...]
    unrecognised: tuple[str, ...] = ()  # keys in no known LoRA format

    @property
    def complete(self) -> bool:
        return not self.unrecognised and all(c.complete for c in self.components)

    def unmatched(self) -> tuple[str, ...]:
        return tuple(k for c in self.components for k in c.unmatched) + self.unrecognised

    def __str__(self) -> str:
        text = ", ".join(str(c) for c in self.components)
        if self.unrecognised:
            text += f", {len(self.unrecognised)} unrecognised keys"
        return text


def describe_unmatched(names: tuple[str, ...], limit: int = 5) -> str:
    """A few unmatched names for an error message."""
    shown = ", ".join(f"'{n}'" for n in names[:limit])
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return shown + more
