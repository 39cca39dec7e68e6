"""The baseline: the protection loop written the way common PGD libraries (torchattacks) write it.

Eager autograd every step, the models' weight gradients left on (``requires_grad`` stays True,
so every forward records what a weight gradient would need), fresh tensors every step and two
clamps (the ball, then the value range: torchattacks clamps images to [0, 1]; unit-norm features
lie in [-1, 1], so this clamp never binds). It computes the reference backend's default
protection of the paper (L-inf ball around the shadow anchor E(S(z)), no random start, the utility guard,
normalised features): a benchmark baseline, not part of the engine. The benchmarks time that protection
(``PAPER`` in bench/harness.py), whose anchor costs the encoder pass the defaults' anchor z does not.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from advface_engine import ProtectConfig
from advface_engine.backends.reference import guard, guard_frame


class NaivePGD:
    """``NaivePGD(shadow, encoder, config)(z) -> z_adv``, like ``torchattacks.PGD(model, eps, alpha, steps)``."""

    def __init__(self, shadow: nn.Module, encoder: nn.Module, config: ProtectConfig):
        wanted = dict(norm="linf", constraint="ball", anchor="shadow", normalize=True, random_start=False,
                      objective="pixel")
        other = {k: getattr(config, k) for k, v in wanted.items() if getattr(config, k) != v}
        if other:
            raise ValueError(f"the naive baseline implements only the paper's L-inf protection (anchor shadow, "
                             f"no random start, pixel objective), not {other}")
        self.shadow, self.encoder, self.config = shadow, encoder, config
        self.loss = nn.L1Loss(reduction="sum")

    def __call__(self, z: Tensor) -> Tensor:
        params = list(self.shadow.parameters()) + list(self.encoder.parameters())
        flags = [p.requires_grad for p in params]
        for p in params:
            p.requires_grad_(True)
        try:
            return self.attack(z)
        finally:  # other benchmarks share the models: leave them as they were
            for p, flag in zip(params, flags, strict=True):
                p.requires_grad_(flag)

    def attack(self, z: Tensor) -> Tensor:
        self.shadow.eval()
        self.encoder.eval()
        eps, alpha, min_cosine = self.config.eps, self.config.alpha, self.config.min_cosine
        with torch.no_grad():
            x_shadow = self.shadow(z)
            anchor = guard(F.normalize(self.encoder(x_shadow), dim=1), guard_frame(z), min_cosine)
        adv = anchor.clone().detach()
        for _ in range(self.config.steps):
            adv.requires_grad = True
            cost = self.loss(self.shadow(adv), x_shadow)
            grad = torch.autograd.grad(cost, adv, retain_graph=False, create_graph=False)[0]
            adv = adv.detach() + alpha * grad.sign()
            delta = torch.clamp(adv - anchor, min=-eps, max=eps)
            adv = torch.clamp(guard(anchor + delta, guard_frame(z), min_cosine), min=-1, max=1).detach()
        return F.normalize(adv, dim=1)
