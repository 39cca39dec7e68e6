"""Public entry points: ``protect`` (one call) and ``Protector`` (configured once, called often).

Features are a (B, D) tensor, or a NumPy array (float16, float32 or float64), returned as they came.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor, nn

from .backends import ReplayingBackend, make_backend
from .backends.modules import as_input_of, first_float, own_parameters, submodules
from .backends.reference import FasterShadow, ReferenceBackend
from .config import ProtectConfig
from .ensemble import as_shadow, members, which
from .errors import ModelMismatchError
from .features import as_tensor, check_features, warn_far_from_unit
from .principal import check_basis
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


def check_models(dim: int, shadow: nn.Module, encoder: nn.Module, like: Tensor) -> None:
    """Run one row through each shadow and E to check that their dimensions agree with z's."""
    enc = first_float(encoder)
    if enc is not None and enc.device != like.device:
        raise ModelMismatchError(f"the shadow decoder is on {like.device} and the encoder on {enc.device}: "
                         "put both on one device")
    probe = torch.zeros(1, dim, dtype=like.dtype, device=like.device)
    for k, one in enumerate(members(shadow)):
        name = which(shadow, k)
        own = first_float(one)
        if own is not None and (own.device, own.dtype) != (like.device, like.dtype):
            raise ModelMismatchError(f"{name} is {own.dtype} on {own.device} and {which(shadow, 0)} {like.dtype} on "
                                     f"{like.device}: an ensemble's shadows share one device and dtype")
        with torch.no_grad():
            try:
                image = one(probe)
            except RuntimeError as err:
                raise ModelMismatchError(f"{name} does not take features of dim {dim}: {err}") from err
            if not isinstance(image, Tensor) or image.dim() != 4 or image.shape[1] != 3:
                got = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
                raise ModelMismatchError(f"{name} must output (B, 3, H, W) images, got {got}")
            try:
                feature = encoder(as_input_of(encoder, image))
            except RuntimeError as err:
                raise ModelMismatchError(
                    f"the encoder does not take {name}'s {tuple(image.shape[1:])} images: {err}"
                ) from err
        if feature.dim() != 2 or feature.shape[1] != dim:
            raise ModelMismatchError(
                f"the encoder outputs features of shape {tuple(feature.shape[1:])} but z has dim {dim}"
            )


class Protector:
    """A configured protection: ``Protector(shadow=S, encoder=E, config=cfg)(z) -> z_adv``.

    ``shadow`` is one decoder, or a list of decoders that protect together (a ``ShadowEnsemble``: each step
    ascends the sum of their objectives; ``config.ensemble_anchor`` says whose anchor is used).

    z is a (B, D) tensor or NumPy array; the output has its type, shape, dtype and device. The work runs
    on the models' device in the shadow's dtype (the encoder may have another; an enclosing
    ``torch.autocast``, ``no_grad`` or ``inference_mode`` does not change the computation). Model checks
    run once per feature dim. ``backend_options`` go to the fused backend, e.g. ``{"dtype": "bf16"}``, or
    to a plugin's factory (``advface_engine.backends.register``). Calls from several
    threads are safe and run one at a time (a backend holds per-batch buffers and CUDA graphs).
    The config is fixed for a Protector's life: build another for other settings.

    ``return_stats``: a call returns ``(z_adv, ProtectionStats)``, per-row figures computed after the
    protection (four forward passes more; CPU tensors, also for NumPy input); ``check_fit(z)`` tells
    whether the shadow fits before any. Rows far from unit norm under ``normalize=True`` are protected
    with a ``FeatureNormWarning``, given once per Protector.

    ``keep_out``: a (k, D) basis with orthonormal rows, ``principal_directions(clean_features, k)``: every
    iterate's change is kept out of its span, so verification, which reads features along the principal
    directions, loses less at the same guard (reference backend; "auto" falls back to it on a GPU).
    """

    def __init__(
        self,
        shadow: nn.Module | list[nn.Module],
        encoder: nn.Module,
        config: ProtectConfig | None = None,
        backend: str = "auto",
        backend_options: dict | None = None,
        return_stats: bool = False,
        keep_out: Tensor | np.ndarray | None = None,
    ):
        if not isinstance(encoder, nn.Module):
            raise TypeError(f"encoder must be a torch.nn.Module, got {type(encoder).__name__}")
        shadow = as_shadow(shadow)
        if not isinstance(return_stats, bool):
            raise ValueError(f"return_stats must be True or False, got {return_stats!r}")
        self.return_stats = return_stats
        config = config if config is not None else ProtectConfig()
        if not isinstance(config, ProtectConfig):
            raise TypeError(f"config must be a ProtectConfig, got {type(config).__name__}")
        self.shadow, self.encoder, self._config = shadow, encoder, config
        self.keep_out = None if keep_out is None else check_basis(keep_out)
        self.backend = make_backend(backend, shadow, encoder, config, keep_out=self.keep_out, **(backend_options or {}))
        # what stats and check_fit run: S as the reference runs it (the reference backend's own, in float32)
        same = isinstance(self.backend, ReferenceBackend) and self.backend.dtype == "fp32"
        self._measured = self.backend.faster if same else FasterShadow(shadow)
        self._replay = self.backend.run_replay if isinstance(self.backend, ReplayingBackend) else None
        self._checked: set[tuple] = set()
        self._warned = False
        self._lock = threading.Lock()

    @property
    def config(self) -> ProtectConfig:
        return self._config

    @property
    def backend_name(self) -> str:
        return self.backend.name

    def __call__(self, z: Tensor | np.ndarray) -> Tensor | np.ndarray | tuple[Tensor | np.ndarray, ProtectionStats]:
        features = as_tensor(z)
        z_adv = self._protect(features)
        stats = self.stats(features, z_adv) if self.return_stats else None
        if isinstance(z, np.ndarray):
            z_adv = z_adv.detach().numpy().astype(z.dtype, copy=False)
        return (z_adv, stats) if self.return_stats else z_adv

    def stats(self, z: Tensor | np.ndarray, z_adv: Tensor | np.ndarray) -> ProtectionStats:
        """ProtectionStats of this Protector's config for features z and their protected z_adv."""
        z, z_adv = as_tensor(z), as_tensor(z_adv)
        device, dtype = self._place(z)
        with self._lock, frozen(self.shadow, self.encoder), torch.inference_mode(False), \
                torch.autocast(device.type, enabled=False):
            return protection_stats(self._work(z, device, dtype), z_adv, self._measured(), self.encoder,
                                    self._config)

    def check_fit(self, z: Tensor | np.ndarray, rows: int = FIT_ROWS, seed: int = 0) -> FitReport:
        """How near the shadow's anchor E(S(z)) is to z, on a seeded sample of ``rows`` rows of z (all of
        them when fewer): ``.fits()`` is False when the shadow does not fit this encoder and these
        features, and ``.message()`` says so with the figure and the remedies."""
        z = as_tensor(z)
        check_features(z)
        if z.shape[0] == 0:
            raise ValueError("check_fit needs at least one feature row")
        picked = torch.as_tensor(sample_rows(z.shape[0], rows, seed), device=z.device)
        device, dtype = self._place(z)
        with self._lock, frozen(self.shadow, self.encoder), torch.inference_mode(False), \
                torch.autocast(device.type, enabled=False):
            work = self._work(z[picked], device, dtype)
            check_models(z.shape[1], self.shadow, self.encoder, work)
            return fit_report(work, self._measured(), self.encoder, self._config)

    def _place(self, z: Tensor) -> tuple[torch.device, torch.dtype]:
        """Where and in what precision the work runs: the shadow's device and dtype."""
        like = first_float(self.shadow)
        return (like.device, like.dtype) if like is not None else (z.device, torch.float32)

    def _protect(self, z: Tensor) -> Tensor:
        far = check_features(z, normalize=self._config.normalize)
        z_adv = self._run(z)
        if far and not self._warned:  # once per Protector: a gallery job calls it batch after batch
            self._warned = True
            warn_far_from_unit(far, z.shape[0])
        return z_adv

    def _run(self, z: Tensor) -> Tensor:
        device, dtype = self._place(z)
        key = (z.shape[1], dtype, device)
        with self._lock:
            # a captured graph that touches no tensor of the models replays without freezing them
            # (ReplayingBackend): the walks over their modules are then not in the way
            if self._replay is not None and key in self._checked and z.shape[0] > 0:
                with torch.inference_mode(False), torch.no_grad(), torch.autocast(device.type, enabled=False):
                    z_adv = self._replay(self._work(z, device, dtype))
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
    z: Tensor | np.ndarray,
    shadow: nn.Module | list[nn.Module],
    encoder: nn.Module,
    config: ProtectConfig | None = None,
    backend: str = "reference",
    return_stats: bool = False,
    keep_out: Tensor | np.ndarray | None = None,
) -> Tensor | np.ndarray | tuple[Tensor | np.ndarray, ProtectionStats]:
    """Replace features z (B, D), a tensor or a NumPy array, by adversarial features of the same type,
    dtype and shape (ALGORITHM.md, Eq. 2-5); with ``return_stats``, ``(z_adv, ProtectionStats)``;
    ``keep_out`` as for ``Protector``."""
    return Protector(shadow=shadow, encoder=encoder, config=config, backend=backend, return_stats=return_stats,
                     keep_out=keep_out)(z)
