"""Identity inference: an attacker network R turns stored features back into faces.

The attack succeeds on a stored feature when the encoder accepts R(stored feature) as the same
person as a *different* clean image of that identity at the verification threshold (cosine
>= threshold); the rate against the clean feature of the stored image itself is reported too.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from .verification import cosine_scores, embed


@torch.no_grad()
def reconstruct(decoder: nn.Module, features: Tensor, batch_size: int = 256) -> Tensor:
    """R(z) in eval mode, batched, returned on CPU."""
    decoder.eval()
    device = next(decoder.parameters()).device
    out = [decoder(features[i:i + batch_size].to(device)).cpu() for i in range(0, len(features), batch_size)]
    return torch.cat(out) if out else torch.zeros(0)


def identity_inference(attacker: nn.Module, encoder: nn.Module, stored: Tensor, other_clean: Tensor,
                       self_clean: Tensor, threshold: float, flip: bool = False) -> tuple[dict, Tensor]:
    """Success rates of ``attacker`` on the ``stored`` features (B, D), and its reconstructions.

    other_clean: clean features of a different image of each row's identity.
    self_clean:  clean features of the image each stored feature was made from.
    Returns ({"success": rate vs other image, "success_self": rate vs the stored image}, images).
    """
    if not (len(stored) == len(other_clean) == len(self_clean)):
        raise ValueError("stored, other_clean and self_clean must have the same number of rows")
    images = reconstruct(attacker, stored)
    z_attack = embed(encoder, images, flip=flip)
    success = float(np.mean(cosine_scores(z_attack, other_clean) >= threshold))
    success_self = float(np.mean(cosine_scores(z_attack, self_clean) >= threshold))
    return {"success": success, "success_self": success_self}, images
