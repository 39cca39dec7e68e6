"""Identity inference: an attacker network R turns stored features back into faces.

The attack succeeds on a stored feature when the encoder accepts R(stored feature) as the same
person as a *different* clean image of that identity at the verification threshold (cosine
>= threshold); the rate against the clean feature of the stored image itself is reported too.

Beside the decoder families (which the server may also use as shadows) the evaluation has two
attackers of its own: the *stronger* one, ``ResidualUpDecoder`` (wider, residual, trained longer),
which is no shadow family and so never protects anything; and the *adaptive* one, which knows the
algorithm and its config and trains on features it protected itself (``ProtectedEncoder``).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models.decoders import ACTIVATIONS, _channels, _stem, upsampling_plan
from .verification import cosine_scores, embed


@torch.no_grad()
def reconstruct(decoder: nn.Module, features: Tensor, batch_size: int = 256) -> Tensor:
    """R(z) in eval mode, batched, returned on CPU."""
    decoder.eval()
    device = next(decoder.parameters()).device
    out = [decoder(features[i:i + batch_size].to(device)).cpu() for i in range(0, len(features), batch_size)]
    return torch.cat(out) if out else torch.zeros(0)


def attack_hits(attacker: nn.Module, encoder: nn.Module, stored: Tensor, other_clean: Tensor, self_clean: Tensor,
                threshold: float, flip: bool = False,
                rows: Tensor | None = None) -> tuple[np.ndarray, np.ndarray, Tensor]:
    """Per attacked row: (accepted as a different clean image of its identity, accepted as the stored image
    itself), and the reconstructions of the ``stored`` features (U, D).

    rows:        which stored feature each attacked row is (B,), so a feature attacked in several pairs is
                 reconstructed once; None: one row per stored feature.
    other_clean: clean features (B, D) of a different image of each row's identity.
    self_clean:  clean features (B, D) of the image each row's stored feature was made from.
    """
    rows = torch.arange(len(stored)) if rows is None else torch.as_tensor(rows)
    if not (len(rows) == len(other_clean) == len(self_clean)):
        raise ValueError("the attacked rows, other_clean and self_clean must have the same number of rows")
    images = reconstruct(attacker, stored)
    z_attack = embed(encoder, images, flip=flip)[rows]
    return (cosine_scores(z_attack, other_clean) >= threshold, cosine_scores(z_attack, self_clean) >= threshold,
            images)


def identity_inference(attacker: nn.Module, encoder: nn.Module, stored: Tensor, other_clean: Tensor,
                       self_clean: Tensor, threshold: float, flip: bool = False) -> tuple[dict, Tensor]:
    """Success rates of ``attacker`` on the ``stored`` features (``attack_hits``), and its reconstructions:
    ({"success": rate vs other image, "success_self": rate vs the stored image}, images)."""
    hits, hits_self, images = attack_hits(attacker, encoder, stored, other_clean, self_clean, threshold, flip)
    return {"success": float(np.mean(hits)), "success_self": float(np.mean(hits_self))}, images


class ResidualBlock(nn.Module):
    """(Conv 3x3, BN, act, Conv 3x3, BN) added to its input, then the activation."""

    def __init__(self, channels: int, act: str = "leaky_relu"):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, channels, 3, 1, 1, bias=False), nn.BatchNorm2d(channels),
                                  ACTIVATIONS[act](channels), nn.Conv2d(channels, channels, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(channels))
        self.act = ACTIVATIONS[act](channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(x + self.body(x))


class ResidualUpDecoder(nn.Sequential):
    """The stronger attacker: per doubling, nearest upsampling, Conv 3x3, BN, act and ``blocks`` residual
    blocks; then Conv 3x3 to RGB and tanh. Kept out of ``models.DECODERS`` so that it is never a shadow."""

    def __init__(self, feature_dim: int = 512, size: int = 112, width: int = 64, blocks: int = 1,
                 act: str = "leaky_relu"):
        side, n_up = upsampling_plan(size)
        layers = _stem(feature_dim, _channels(width, n_up, 0), side, act)
        for i in range(n_up):
            cin, cout = _channels(width, n_up, i), _channels(width, n_up, i + 1)
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(cin, cout, 3, 1, 1, bias=False),
                       nn.BatchNorm2d(cout), ACTIVATIONS[act](cout)]
            layers += [ResidualBlock(cout, act) for _ in range(blocks)]
        layers += [nn.Conv2d(_channels(width, n_up, n_up), 3, 3, 1, 1), nn.Tanh()]
        super().__init__(*layers)
        self.arch, self.arch_kwargs = "residual_up", dict(feature_dim=feature_dim, size=size, width=width,
                                                          blocks=blocks, act=act)


class ProtectedEncoder(nn.Module):
    """The adaptive attacker's view of the encoder: x -> protector(E(x)), E(x) unit-norm. Given to
    ``train_decoder`` as the encoder, it trains a reconstruction network on (protected feature, image)
    pairs; ``protector`` is the attacker's own (its own shadow, the server's algorithm and config)."""

    def __init__(self, encoder: nn.Module, protector):
        super().__init__()
        self.encoder, self.shadow, self.protector = encoder, protector.shadow, protector

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            z = F.normalize(self.encoder(x), dim=1)
        return self.protector(z)
