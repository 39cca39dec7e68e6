"""Public entry points: ``protect`` (one call) and ``Protector`` (configured once, called often)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from .backends import make_backend
from .backends.decoder import as_input_of, first_float, own_parameters, submodules
from .config import ProtectConfig
from .stats import FIT_ROWS, FitReport, ProtectionStats, fit_report, protection_stats, sample_rows

_FROZEN_LOCK = threading.Lock()
_FROZEN: dict[int, list] = {}  # id(module) -> [entries, [(submodule, training)] if any trained, [grad params]]


def _freeze(module: nn.Module) -> None:
    """Enter ``frozen`` for one module (under _FROZEN_LOCK): the first entry saves and switches off."""
    entry = _FROZEN.get(id(module))
    if entry is not None:
        entry[0] += 1
        return
    found = submodules(module)
    modes = [(m, m.training) for m in found] if any(m.training for m in found) else []
    grads = [p for p in own_parameters(found) if p.requires_grad]
    _FROZEN[id(module)] = [1, modes, grads]
    try:
        if modes:
            module.eval()
        for p in grads:
            p.requires_grad_(False)
    except BaseException:
        _restore(module)
        raise


def _thaw(module: nn.Module) -> None:
    """Leave ``frozen`` for one module (under _FROZEN_LOCK): the last to leave restores."""
    _FROZEN[id(module)][0] -= 1
    if _FROZEN[id(module)][0] == 0:
        _restore(module)


def _restore(module: nn.Module) -> None:
    _, modes, grads = _FROZEN.pop(id(module))
    if modes:  # train() as the old mode asks (overrides run), then each module's own flag
        module.train(modes[0][1])
        for m, mode in modes:
            m.training = mode
    for p in grads:
        p.requires_grad_(True)


@contextlib.contextmanager
def frozen(*modules: nn.Module) -> Iterator[None]:
    """Eval mode and no parameter gradients for the call; both restored after, module by module.

    Safe when calls overlap on the same modules (threads, or Protectors sharing models): the
    first to enter saves the modules' state, the last to leave restores it. Only what was on is
    switched off and back on (``train()`` is called, so overrides of it run), so models already
    frozen cost one walk of their modules. A failure on the way in restores what was entered."""
    entered: list[nn.Module] = []
    try:
        with _FROZEN_LOCK:
            for module in modules:
                _freeze(module)
                entered.append(module)
        yield
    finally:
        with _FROZEN_LOCK:
            for module in entered:
                _thaw(module)


def check_features(z: Tensor) -> None:
    """A (B, D) floating tensor whose rows are finite and not all zero, else a ValueError naming the bad
    rows. A zero row has no direction (a placeholder such as a failed enrolment): protected, every such
    row would become the same vector and match the others; the gallery job refuses them alike."""
    if not isinstance(z, Tensor):
        raise TypeError(f"z must be a torch.Tensor, got {type(z).__name__}")
    if z.dim() != 2:
        raise ValueError(f"z must have shape (B, D), got {tuple(z.shape)}")
    if not z.is_floating_point():
        raise ValueError(f"z must be a floating tensor, got {z.dtype}")
    nonfinite = (~torch.isfinite(z)).any(dim=1)
    if not (nonfinite | ~z.any(dim=1)).any():  # one host sync when all is well
        return
    for name, bad in (("NaN or Inf in", nonfinite), ("all-zero", ~z.any(dim=1))):
        rows = bad.nonzero().flatten()
        if rows.numel():
            more = f" and {rows.numel() - 10} more" if rows.numel() > 10 else ""
            raise ValueError(f"z has {name} rows {rows[:10].tolist()}{more}")


def check_models(dim: int, shadow: nn.Module, encoder: nn.Module, like: Tensor) -> None:
    """Run one row through S and E to check that their dimensions agree with z's."""
    enc = first_float(encoder)
    if enc is not None and enc.device != like.device:
        raise ValueError(f"the shadow decoder is on {like.device} and the encoder on {enc.device}: "
                         "put both on one device")
    probe = torch.zeros(1, dim, dtype=like.dtype, device=like.device)
    with torch.no_grad():
        try:
            image = shadow(probe)
        except RuntimeError as err:
            raise ValueError(f"the shadow decoder does not take features of dim {dim}: {err}") from err
        if image.dim() != 4 or image.shape[1] != 3:
            raise ValueError(f"the shadow decoder must output (B, 3, H, W) images, got {tuple(image.shape)}")
        try:
            feature = encoder(as_input_of(encoder, image))
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

    The output has z's shape, dtype and device; the work runs on the models' device in the shadow's
    dtype (the encoder may have another; an enclosing ``torch.autocast``, ``no_grad`` or
    ``inference_mode`` does not change the computation). Model checks run once per feature dim.
    ``backend_options`` go to the fused backend, e.g. ``{"dtype": "bf16"}``. Calls from several
    threads are safe and run one at a time (a backend holds per-batch buffers and CUDA graphs).
    The config is fixed for a Protector's life: build another for other settings.

    ``return_stats``: a call returns ``(z_adv, ProtectionStats)``, per-row figures computed after the
    protection (four forward passes more); ``check_fit(z)`` tells whether the shadow fits before any.
    """

    def __init__(
        self,
        shadow: nn.Module,
        encoder: nn.Module,
        config: ProtectConfig | None = None,
        backend: str = "auto",
        backend_options: dict | None = None,
        return_stats: bool = False,
    ):
        if not isinstance(shadow, nn.Module) or not isinstance(encoder, nn.Module):
            raise TypeError("shadow and encoder must be torch.nn.Module instances")
        if not isinstance(return_stats, bool):
            raise ValueError(f"return_stats must be True or False, got {return_stats!r}")
        self.return_stats = return_stats
        config = config if config is not None else ProtectConfig()
        if not isinstance(config, ProtectConfig):
            raise TypeError(f"config must be a ProtectConfig, got {type(config).__name__}")
        self.shadow, self.encoder, self._config = shadow, encoder, config
        self.backend = make_backend(backend, shadow, encoder, config, **(backend_options or {}))
        self._checked: set[tuple] = set()
        self._lock = threading.Lock()

    @property
    def config(self) -> ProtectConfig:
        return self._config

    @property
    def backend_name(self) -> str:
        return self.backend.name

    def __call__(self, z: Tensor) -> Tensor | tuple[Tensor, ProtectionStats]:
        z_adv = self._protect(z)
        return (z_adv, self.stats(z, z_adv)) if self.return_stats else z_adv

    def stats(self, z: Tensor, z_adv: Tensor) -> ProtectionStats:
        """ProtectionStats of this Protector's config for features z and their protected z_adv."""
        device, dtype = self._place(z)
        with self._lock, frozen(self.shadow, self.encoder), torch.inference_mode(False), \
                torch.autocast(device.type, enabled=False):
            return protection_stats(self._work(z, device, dtype), z_adv, self.shadow, self.encoder, self._config)

    def check_fit(self, z: Tensor, rows: int = FIT_ROWS, seed: int = 0) -> FitReport:
        """How near the shadow's anchor E(S(z)) is to z, on a seeded sample of ``rows`` rows of z (all of
        them when fewer): ``.fits()`` is False when the shadow does not fit this encoder and these
        features, and ``.message()`` says so with the figure and the remedies."""
        check_features(z)
        if z.shape[0] == 0:
            raise ValueError("check_fit needs at least one feature row")
        picked = torch.as_tensor(sample_rows(z.shape[0], rows, seed), device=z.device)
        device, dtype = self._place(z)
        with self._lock, frozen(self.shadow, self.encoder), torch.inference_mode(False), \
                torch.autocast(device.type, enabled=False):
            work = self._work(z[picked], device, dtype)
            check_models(z.shape[1], self.shadow, self.encoder, work)
            return fit_report(work, self.shadow, self.encoder, self._config)

    def _place(self, z: Tensor) -> tuple[torch.device, torch.dtype]:
        """Where and in what precision the work runs: the shadow's device and dtype."""
        like = first_float(self.shadow)
        return (like.device, like.dtype) if like is not None else (z.device, torch.float32)

    def _protect(self, z: Tensor) -> Tensor:
        check_features(z)
        device, dtype = self._place(z)
        key = (z.shape[1], dtype, device)
        with self._lock:
            # a captured graph that touches no tensor of the models replays without freezing them
            # (FusedBackend.run_replay): the walks over their modules are then not in the way
            replay = getattr(self.backend, "run_replay", None)
            if replay is not None and key in self._checked and z.shape[0] > 0:
                with torch.inference_mode(False), torch.no_grad(), torch.autocast(device.type, enabled=False):
                    z_adv = replay(self._work(z, device, dtype))
                if z_adv is not None:
                    return z_adv.to(device=z.device, dtype=z.dtype)
            # the caller's autocast must not change the precision asked for, nor its no_grad or
            # inference_mode switch off the gradient with respect to z that the steps need
            with frozen(self.shadow, self.encoder), torch.inference_mode(False), torch.enable_grad(), \
                    torch.autocast(device.type, enabled=False):
                work = self._work(z, device, dtype)
                if key not in self._checked:
                    check_models(z.shape[1], self.shadow, self.encoder, work)
                    self._checked.add(key)
                z_adv = work.clone() if z.shape[0] == 0 else self.backend.run(work)
        return z_adv.to(device=z.device, dtype=z.dtype)

    @staticmethod
    def _work(z: Tensor, device: torch.device, dtype: torch.dtype) -> Tensor:
        work = z.detach().to(device=device, dtype=dtype)
        if work.is_inference():  # made under inference_mode: autograd refuses to record it
            work = work.clone()
        return work


def protect(
    z: Tensor,
    shadow: nn.Module,
    encoder: nn.Module,
    config: ProtectConfig | None = None,
    backend: str = "reference",
    return_stats: bool = False,
) -> Tensor | tuple[Tensor, ProtectionStats]:
    """Replace features z (B, D) by adversarial features (ALGORITHM.md, Eq. 2-5); with ``return_stats``,
    ``(z_adv, ProtectionStats)``."""
    return Protector(shadow=shadow, encoder=encoder, config=config, backend=backend, return_stats=return_stats)(z)
