"""Several shadows protecting together: the step ascends the sum of every shadow's objective.

A feature pushed away from one shadow's reconstruction may still be inverted by a network of another
family; stepping on the sum of the per-shadow losses (each against its own x~_k = S_k(z)) asks the step
to fool all of them at once (ALGORITHM.md, "Shadow ensembles").
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn


class ShadowEnsemble(nn.ModuleList):
    """K >= 2 shadow decoders; the protection's ``shadow`` when several are given.

    It is a container, not a decoder: calling it raises, so no code takes it for one shadow by mistake.
    ``members(shadow)`` gives the decoders of an ensemble or of a single shadow alike."""

    def __init__(self, shadows: Iterable[nn.Module]):
        super().__init__(shadows)
        self.training = False  # a container's own mode means nothing (and must not read as a shadow in training)

    def forward(self, *args, **kwargs):
        raise TypeError("a ShadowEnsemble is not one decoder: run each of its shadows (advface_engine.ensemble."
                        "members)")


def as_shadow(shadow: nn.Module | Iterable[nn.Module]) -> nn.Module:
    """The protection's shadow from what a caller gave: one decoder as it is; a list, tuple or
    ``nn.ModuleList`` of decoders as a ``ShadowEnsemble`` (one of them: that decoder itself)."""
    if isinstance(shadow, nn.Module) and not isinstance(shadow, nn.ModuleList):
        return shadow
    if isinstance(shadow, (str, bytes)) or not isinstance(shadow, (nn.ModuleList, list, tuple)):
        raise TypeError(f"shadow must be a torch.nn.Module or a list of them, got {type(shadow).__name__}")
    shadows = list(shadow)
    if not shadows:
        raise ValueError("the shadow list is empty: give at least one shadow decoder")
    for k, module in enumerate(shadows):
        if not isinstance(module, nn.Module) or isinstance(module, nn.ModuleList):
            raise TypeError(f"shadow {k + 1} of {len(shadows)} is a {type(module).__name__}, not a decoder "
                            "(torch.nn.Module)")
    if len({id(m) for m in shadows}) < len(shadows):
        raise ValueError("the same shadow decoder is listed twice; an ensemble's shadows are distinct decoders")
    return shadows[0] if len(shadows) == 1 else ShadowEnsemble(shadows)


def members(shadow: nn.Module) -> list[nn.Module]:
    """The decoders of an ensemble, or [shadow] for a single one."""
    return list(shadow) if isinstance(shadow, ShadowEnsemble) else [shadow]


def which(shadow: nn.Module, k: int) -> str:
    """How messages name member k: "the shadow decoder", or "shadow 2 of 3" in an ensemble."""
    return f"shadow {k + 1} of {len(shadow)}" if isinstance(shadow, ShadowEnsemble) else "the shadow decoder"

