"""Public entry points: ``protect`` (one call) and ``Protector`` (configured once, called often)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from .backends import make_backend
from .config import ProtectConfig


@contextlib.contextmanager
def frozen(*modules: nn.Module) -> Iterator[None]:
    """Eval mode and no parameter gradients for the call; both restored after."""
    saved = []
    for module in modules:
        saved.append((module, module.training, [(p, p.requires_grad) for p in module.parameters()]))
        module.eval()
        for p in module.parameters():
            p.requires_grad_(False)
    try:
        yield
    finally:
        for module, training, flags in saved:
            module.train(training)
            for p, flag in flags:
                p.requires_grad_(flag)


def _param_like(module: nn.Module) -> Tensor | None:
    for t in list(module.parameters()) + list(module.buffers()):
        if t.is_floating_point():
            return t
    return None


def check_features(z: Tensor) -> None:
    """A (B, D) floating tensor with only finite values, else a ValueError naming bad rows."""
    if not isinstance(z, Tensor):
        raise TypeError(f"z must be a torch.Tensor, got {type(z).__name__}")
    if z.dim() != 2:
        raise ValueError(f"z must have shape (B, D), got {tuple(z.shape)}")
    if not z.is_floating_point():
        raise ValueError(f"z must be a floating tensor, got {z.dtype}")
    bad = (~torch.isfinite(z)).any(dim=1).nonzero().flatten()
    if bad.numel():
        shown = bad[:10].tolist()
        more = f" and {bad.numel() - 10} more" if bad.numel() > 10 else ""
        raise ValueError(f"z has NaN or Inf in rows {shown}{more}")


def check_models(dim: int, shadow: nn.Module, encoder: nn.Module, like: Tensor) -> None:
    """Run one row through S and E to check that their dimensions agree with z's."""
    probe = torch.zeros(1, dim, dtype=like.dtype, device=like.device)
    with torch.no_grad():
        try:
            image = shadow(probe)
        except RuntimeError as err:
            raise ValueError(f"the shadow decoder does not take features of dim {dim}: {err}") from err
        if image.dim() != 4 or image.shape[1] != 3:
            raise ValueError(f"the shadow decoder must output (B, 3, H, W) images, got {tuple(image.shape)}")
        try:
            feature = encoder(image)
        except RuntimeError as err:
            raise ValueError(
                f"the encoder does not take the shadow decoder's {tuple(image.shape[1:])} images: {err}"
            ) from err
    if feature.dim() != 2 or feature.shape[1] != dim:
        raise ValueError(
            f"the encoder outputs features of shape {tuple(feature.shape[1:])} but z has dim {dim}"
        )


class Protector:
    """A configured protection: ``Protector(shadow=S, encoder=E, config=cfg)(z) -> z_adv``.

    The output has z's shape, dtype and device; the work runs on the models' device in the
    models' dtype (an enclosing ``torch.autocast`` is switched off for the call). Model checks
    run once per feature dim. ``backend_options`` go to the fused backend, e.g. ``{"dtype": "bf16"}``.
    """

    def __init__(
        self,
        shadow: nn.Module,
        encoder: nn.Module,
        config: ProtectConfig | None = None,
        backend: str = "auto",
        backend_options: dict | None = None,
    ):
        if not isinstance(shadow, nn.Module) or not isinstance(encoder, nn.Module):
            raise TypeError("shadow and encoder must be torch.nn.Module instances")
        self.shadow, self.encoder = shadow, encoder
        self.config = config if config is not None else ProtectConfig()
        if not isinstance(self.config, ProtectConfig):
            raise TypeError(f"config must be a ProtectConfig, got {type(self.config).__name__}")
        self.backend = make_backend(backend, shadow, encoder, self.config, **(backend_options or {}))
        self._checked: set[tuple] = set()

    @property
    def backend_name(self) -> str:
        return self.backend.name

    def __call__(self, z: Tensor) -> Tensor:
        check_features(z)
        if z.shape[0] == 0:
            return z.clone()
        like = _param_like(self.shadow)
        device = like.device if like is not None else z.device
        dtype = like.dtype if like is not None else torch.float32
        work = z.detach().to(device=device, dtype=dtype)
        key = (z.shape[1], dtype, device)
        # a caller's autocast region must not change the precision the backend was asked for
        with frozen(self.shadow, self.encoder), torch.autocast(device.type, enabled=False):
            if key not in self._checked:
                check_models(z.shape[1], self.shadow, self.encoder, work)
                self._checked.add(key)
            z_adv = self.backend.run(work)
        return z_adv.to(device=z.device, dtype=z.dtype)


def protect(
    z: Tensor,
    shadow: nn.Module,
    encoder: nn.Module,
    config: ProtectConfig | None = None,
    backend: str = "reference",
) -> Tensor:
    """Replace features z (B, D) by adversarial features (ALGORITHM.md, Eq. 2-5)."""
    return Protector(shadow=shadow, encoder=encoder, config=config, backend=backend)(z)
