"""Backends run the T-step loop. Each is built from (shadow, encoder, config, **options) and is a ``Backend``.

``reference`` is the specification; ``fused`` (Triton + CUDA graphs) must equal it. Other backends are
plugins: ``register(name, factory)`` in the process, or an entry point of the ``advface_engine.backends``
group in a distribution's metadata (name = backend name, object = factory), found when first asked for::

    [project.entry-points."advface_engine.backends"]
    mine = "my_package.backend:MyBackend"
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from ..config import ProtectConfig
from ..ensemble import as_shadow
from ..errors import UnsupportedModelError
from .options import FUSED_DTYPES as FUSED_DTYPES  # re-exported: the fused backend's options
from .options import FUSED_OPTIONS as FUSED_OPTIONS
from .options import check_fused_options
from .reference import REFERENCE_DTYPES, ReferenceBackend

BACKEND_NAMES = ("auto", "reference", "fused")  # built in
ENTRY_POINT_GROUP = "advface_engine.backends"


@runtime_checkable
class Backend(Protocol):
    """What the Protector calls. ``run(z)``: z (B, D), B >= 1, already checked, in the shadow's dtype on its
    device; returns the protected rows, same shape (ALGORITHM.md). The Protector freezes the models and
    switches autograd on around the call, and holds a lock: a backend sees one call at a time."""

    name: str

    def run(self, z: Tensor) -> Tensor: ...


@runtime_checkable
class ReplayingBackend(Backend, Protocol):
    """A backend that may answer a call without the models frozen, from a captured graph that reads none of
    their tensors (``FusedBackend``): ``run_replay(z)`` returns the protected rows, or None when it cannot
    (the Protector then freezes the models and calls ``run``)."""

    def run_replay(self, z: Tensor) -> Tensor | None: ...


BackendFactory = Callable[..., Backend]  # (shadow, encoder, config, **options) -> Backend
_REGISTERED: dict[str, BackendFactory] = {}


def register(name: str, factory: BackendFactory) -> None:
    """Make backend ``name`` available to ``Protector(..., backend=name)``: ``factory(shadow, encoder, config,
    **backend_options)`` builds it. A name registered again is replaced; built-in names are refused."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"a backend name is a non-empty string, got {name!r}")
    if name in BACKEND_NAMES:
        raise ValueError(f"{name!r} is a built-in backend; register yours under another name")
    if not callable(factory):
        raise TypeError(f"a backend factory is callable (shadow, encoder, config, **options), got {factory!r}")
    _REGISTERED[name] = factory


def _entry_points() -> dict:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name not in BACKEND_NAMES}


def available() -> list[str]:
    """Every backend name ``make_backend`` takes: the built-in ones, registered ones and installed plugins'
    (their entry points are listed, not loaded)."""
    return [*BACKEND_NAMES, *sorted(_REGISTERED.keys() | _entry_points().keys())]


def _plugin(name: str) -> BackendFactory | None:
    """The factory registered as ``name``, else the one its entry point names (loaded, then registered)."""
    if name not in _REGISTERED:
        found = _entry_points().get(name)
        if found is None:
            return None
        register(name, found.load())
    return _REGISTERED[name]


def _device_of(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def make_backend(name: str, shadow: nn.Module, encoder: nn.Module, config: ProtectConfig,
                 keep_out: Tensor | None = None, **options) -> Backend:
    """Build backend ``name``; "auto" picks fused on a CUDA device, else reference.

    ``options`` go to the fused backend (e.g. dtype="bf16", graphs=False), the reference backend (dtype
    "fp32" or "bf16"; "auto" off the GPU keeps such a dtype and ignores the fused options) or a plugin's
    factory.
    ``shadow`` may be a list of shadows (``ensemble.as_shadow``). ``keep_out``: a basis the steps are kept out
    of (``ReferenceBackend``), taken by both built-in backends; a plugin is not given one.
    """
    shadow = as_shadow(shadow)
    if name not in BACKEND_NAMES:
        factory = _plugin(name) if isinstance(name, str) else None
        if factory is None:
            raise ValueError(f"backend must be one of {available()}, got {name!r}")
        if keep_out is not None:
            raise ValueError(f"backend {name!r} takes no keep_out basis: use backend 'reference'")
        backend = factory(shadow, encoder, config, **options)
        if not isinstance(backend, Backend):
            raise TypeError(f"backend {name!r}: its factory gave a {type(backend).__name__}, which has no `name` "
                            "and `run(z)` (advface_engine.backends.Backend)")
        return backend
    if name == "reference":
        if set(options) - {"dtype"}:
            raise ValueError(f"the reference backend takes only the option dtype, got {sorted(options)}")
        return ReferenceBackend(shadow, encoder, config, keep_out=keep_out, **options)
    check_fused_options(options)
    if name == "fused":
        from .fused import FusedBackend

        return FusedBackend(shadow, encoder, config, keep_out=keep_out, **options)
    if _device_of(shadow).type != "cuda":  # the reference, in the dtype asked for where it has it
        dtype = options.get("dtype")
        if dtype is not None and dtype not in REFERENCE_DTYPES:
            warnings.warn(f"decoder dtype {dtype!r} is the fused backend's (a CUDA GPU); the reference backend runs "
                          f"here, in fp32 (it takes {sorted(REFERENCE_DTYPES)})", stacklevel=3)
        return ReferenceBackend(shadow, encoder, config, keep_out=keep_out,
                                **({"dtype": dtype} if dtype in REFERENCE_DTYPES else {}))
    try:
        from .fused import FusedBackend

        return FusedBackend(shadow, encoder, config, keep_out=keep_out, **options)
    except (ImportError, UnsupportedModelError) as err:
        warnings.warn(f"fused backend unavailable ({err}); using the reference backend", stacklevel=3)
        return ReferenceBackend(shadow, encoder, config, keep_out=keep_out)
