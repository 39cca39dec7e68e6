"""What the fused backend launches kernels for, as the ahead-of-time kernel check takes it (a ``Launches``,
kernels/variants.py): its dtype options, the decoder heads and the activations of the families' plans.
Built here, on the backends' side, and handed to kernels/aot.py (``advface check-kernels``): the kernels
package does not import the backends or the models."""

from __future__ import annotations

from ..kernels.l1_sign import HEADS
from ..kernels.variants import Launches
from ..models import build_model
from .options import FUSED_DTYPES
from .plan import Act, Dense, build_plan

FAMILIES = ("dcgan", "nbnet", "upconv")


def plan_ops(family: str, feature_dim: int = 512, size: int = 112) -> tuple[str, set[tuple[str, bool]]]:
    """The head and the (activation, BatchNorm-scale) pairs of a decoder family's plan."""
    plan = build_plan(build_model(family, feature_dim=feature_dim, size=size).eval())
    acts = [op for op in plan.ops if isinstance(op, Act)]
    acts += [act for op in plan.ops if isinstance(op, Dense) for act, _ in op.layers]
    return plan.head, {(act.kind, act.scale is not None) for act in acts}


def fused_launches(families=FAMILIES, dims: tuple[int, ...] = Launches.dims,
                   per_sample: int = Launches.per_sample) -> Launches:
    """What the fused backend launches kernels for with these decoder families and feature dims: its dtype
    options (each compiled), every output head (tanh is the families' default, sigmoid and identity are
    options) and the activations of the families' plans."""
    heads, acts = set(HEADS), set()
    for family in families:
        head, family_acts = plan_ops(family)
        heads.add(head)
        acts |= family_acts
    return Launches(FUSED_DTYPES, sorted(heads), sorted(acts), tuple(dims), per_sample)
