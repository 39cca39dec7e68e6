"""Training of shadow / attacker decoders (Eq. 1) and of small encoders, resumable and seeded.

Every epoch visits the data in a permutation drawn from (seed, epoch), and a training
checkpoint (weights, optimiser, epoch and the run's settings) is written atomically after each
epoch, so an interrupted run resumed from its checkpoint ends with the same weights as an
uninterrupted one; a checkpoint written for other settings (data, models, hyper-parameters) is
refused, naming what differs. A decoder's training features are cached beside its checkpoint, so a rerun
does not encode every image again.
"""

from __future__ import annotations

import collections
import hashlib
import json
import math
import os
import sys
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data.folders import ImageFolder, NpyImages, take
from .errors import BadFeaturesError, IncompatibleCheckpointError, RefusedFileError
from .models.io import model_checksum, save_model, write_file
from .progress import progress_bar
from .protect import frozen

Images = Tensor | ImageFolder | NpyImages  # in memory, or read from disk batch by batch
MIN_NORM = 1e-12  # F.normalize's eps: a feature shorter than this has no direction to train on


@torch.no_grad()
def encode(encoder: nn.Module, images: Images, batch_size: int = 256, normalize: bool = True,
           device: str | torch.device | None = None) -> Tensor:
    """Features E(x) of ``images`` in eval mode, batched; unit-norm when ``normalize``. Returned on CPU."""
    training = encoder.training
    encoder.eval()
    device = device or next(encoder.parameters()).device
    out = []
    for i in range(0, len(images), batch_size):
        z = encoder(take(images, range(i, min(i + batch_size, len(images)))).to(device))
        out.append((F.normalize(z, dim=1) if normalize else z).cpu())
    encoder.train(training)
    return torch.cat(out) if out else torch.zeros(0, 0)


def check_training_features(z: Tensor, encoder: nn.Module) -> None:
    """Refuse features a decoder cannot learn from (``BadFeaturesError`` naming the encoder and the images):
    NaN or Inf values, or a norm that is zero or below MIN_NORM (a diverged or dead encoder, or wrong
    images); otherwise a decoder trains on them without a word and learns nothing."""
    norm = torch.linalg.vector_norm(z, dim=1, dtype=torch.promote_types(z.dtype, torch.float32))
    bad = (~torch.isfinite(z).all(dim=1) | ~(norm >= MIN_NORM)).nonzero().flatten().tolist()
    if bad:
        more = f" and {len(bad) - 10} more" if len(bad) > 10 else ""
        name = getattr(encoder, "arch", type(encoder).__name__)
        raise BadFeaturesError(f"the encoder ({name}) gives {len(bad)} of {len(z)} training images features with "
                               f"NaN or Inf values or a norm below {MIN_NORM:g} (images {bad[:10]}{more}): check the "
                               "encoder's weights and that the images are what it expects", bad)


def _features(encoder: nn.Module, images: Images, normalize: bool, key: dict,
              checkpoint: str | os.PathLike | None) -> Tensor:
    """E(x) of the training images on the CPU, checked (``check_training_features``), unit-norm when
    ``normalize``. With a checkpoint they are cached in ``<checkpoint>.features`` (safetensors) for ``key``
    (the data's and the encoder's checksums), so a rerun reads them instead of encoding every image again."""
    from safetensors.torch import load_file
    from safetensors.torch import save as safetensors_bytes

    cache = Path(f"{checkpoint}.features") if checkpoint else None
    z = None
    if cache is not None and cache.is_file():
        from safetensors import safe_open

        try:
            with safe_open(str(cache), framework="pt") as f:
                found = f.metadata() or {}
            z = load_file(str(cache))["features"] if found == key else None
        except Exception:  # a damaged or foreign cache is computed again
            z = None
        if z is not None and len(z) != len(images):
            z = None
    if z is None:
        z = encode(encoder, images, normalize=False, device=next(encoder.parameters()).device)
        if cache is not None:
            write_file(cache, safetensors_bytes({"features": z.contiguous()}, metadata=key))
    check_training_features(z, encoder)
    return F.normalize(z, dim=1) if normalize else z


def data_checksum(*data: Tensor | ImageFolder | NpyImages) -> str:
    """sha256 of the tensors' values, or of an image set's fingerprint (the training data a
    checkpoint was written for)."""
    digest = hashlib.sha256()
    for t in data:
        if isinstance(t, Tensor):
            digest.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        else:
            digest.update(f"{type(t).__name__}:{t.fingerprint()}".encode())
    return digest.hexdigest()


class _Batches:
    """``indices -> images on device``. A tensor moves to the device once; a set on disk is read per
    batch, the next one in a background thread while the current one trains (``prefetch``)."""

    def __init__(self, images: Images, device: torch.device):
        self.images, self.device = images, device
        self.on_device = images.to(device) if isinstance(images, Tensor) else None
        self._reader: ThreadPoolExecutor | None = None
        self._ahead: collections.deque[tuple[Tensor, Future]] = collections.deque(maxlen=2)

    def prefetch(self, idx: Tensor) -> None:
        if self.on_device is None:
            self._reader = self._reader or ThreadPoolExecutor(1, thread_name_prefix="advface-prefetch")
            self._ahead.append((idx, self._reader.submit(take, self.images, idx.tolist())))

    def __call__(self, idx: Tensor) -> Tensor:
        if self.on_device is not None:
            return self.on_device[idx.to(self.device)]
        if self._ahead and torch.equal(self._ahead[0][0], idx):
            return self._ahead.popleft()[1].result().to(self.device)
        return take(self.images, idx.tolist()).to(self.device)  # not read ahead (an epoch's first batch)


def _fit(modules: dict[str, nn.Module], loss_fn: Callable[[Tensor, torch.Generator], Tensor], n: int, epochs: int,
         batch_size: int, lr: float, seed: int, checkpoint: str | os.PathLike | None, desc: str,
         progress: bool, settings: dict | None = None,
         prefetch: Callable[[Tensor], None] | None = None) -> list[float]:
    """Adam over all ``modules``; ``loss_fn(indices, generator)`` gives a batch's loss.

    The generator of each epoch is seeded by (seed, epoch) and draws the permutation and any
    augmentation, so resuming at an epoch boundary replays exactly. ``settings`` (the caller's
    data and models) join the hyper-parameters in the checkpoint; resuming under others is refused.
    ``prefetch(indices)`` is told the next batch before the current one is computed.
    Returns each epoch's mean loss.
    """
    if n == 0:
        raise ValueError("no training data")
    if epochs < 1 or batch_size < 1 or not lr > 0:
        raise ValueError("epochs and batch_size must be >= 1 and lr > 0")
    params = [p for m in modules.values() for p in m.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    history: list[float] = []
    start = 0
    path = Path(checkpoint) if checkpoint else None
    settings = json.loads(json.dumps({
        "epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed, "samples": n,
        "modules": {k: [getattr(m, "arch", type(m).__name__), getattr(m, "arch_kwargs", None)]
                    for k, m in modules.items()}, **(settings or {})}, sort_keys=True))
    if path is not None and path.is_file():
        start, history = _resume(path, settings, modules, optimizer, schedule, epochs)
        if progress:
            print(f"{desc}: resuming from {path} at epoch {start} of {epochs}", file=sys.stderr)
    for m in modules.values():
        m.train()
    steps_per_epoch = math.ceil(n / batch_size)
    bar = progress_bar(total=epochs * steps_per_epoch, initial=start * steps_per_epoch, desc=desc, leave=False,
                       progress=progress)
    for epoch in range(start, epochs):
        gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order = torch.randperm(n, generator=gen)
        total = 0.0
        batches = list(order.split(batch_size))
        for k, idx in enumerate(batches):
            if prefetch is not None and k + 1 < len(batches):
                prefetch(batches[k + 1])
            loss = loss_fn(idx, gen)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(idx)
            bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.4f}", refresh=False)
            bar.update(1)
        schedule.step()
        history.append(total / n)
        if path is not None:
            state = {"modules": {k: m.state_dict() for k, m in modules.items()}, "optimizer": optimizer.state_dict(),
                     "schedule": schedule.state_dict(), "epoch": epoch + 1, "history": history,
                     "settings": json.dumps(settings, sort_keys=True)}
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            torch.save(state, tmp)
            os.replace(tmp, path)
    bar.close()
    for m in modules.values():
        m.eval()
    return history


CHECKPOINT_FIELDS = {"modules": dict, "optimizer": dict, "schedule": dict, "epoch": int, "history": list}


def _resume(path: Path, settings: dict, modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer,
            schedule, epochs: int) -> tuple[int, list[float]]:
    """Load the training checkpoint at ``path`` into the modules, optimiser and schedule; returns (epoch,
    history). The file is untrusted: anything but a checkpoint of this run is one error naming it
    (``RefusedFileError``, or ``IncompatibleCheckpointError`` for another run's)."""
    from .models.io import load_weights_only

    state = load_weights_only(path, "training checkpoint")
    if not isinstance(state, dict):
        raise RefusedFileError(f"{path}: not a training checkpoint (it holds a {type(state).__name__})")
    missing = [k for k in CHECKPOINT_FIELDS if k not in state]
    if missing:
        raise RefusedFileError(f"{path}: not a complete training checkpoint (missing {', '.join(missing)})")
    for key, kind in CHECKPOINT_FIELDS.items():
        if not isinstance(state[key], kind) or isinstance(state[key], bool):
            raise RefusedFileError(f"{path}: damaged training checkpoint ({key} is of type "
                                   f"{type(state[key]).__name__}, expected {kind.__name__})")
    if "settings" in state:
        try:
            old = json.loads(state["settings"])
            if not isinstance(old, dict):
                raise ValueError("not a JSON object")
        except (TypeError, ValueError, RecursionError) as err:
            raise RefusedFileError(f"{path}: damaged training checkpoint (settings: {err})") from None
        differ = sorted(k for k in settings.keys() | old.keys() if settings.get(k) != old.get(k))
        if differ:
            raise IncompatibleCheckpointError(f"{path} was written for another training run ({', '.join(differ)} "
                                              "differ); rerun with the same settings to resume it, or delete it to "
                                              "start over")
    epoch, history = state["epoch"], state["history"]
    if not 0 <= epoch <= epochs:
        raise RefusedFileError(f"{path}: damaged training checkpoint (epoch {epoch} of a {epochs}-epoch run)")
    if len(history) != epoch or not all(isinstance(x, float) for x in history):
        raise RefusedFileError(f"{path}: damaged training checkpoint (a history of {len(history)} items for epoch "
                               f"{epoch})")
    if sorted(state["modules"]) != sorted(modules):
        raise IncompatibleCheckpointError(f"{path}: holds modules {sorted(state['modules'])}, this run trains "
                                          f"{sorted(modules)}")
    own = schedule.state_dict()  # load_state_dict takes any dict: every value it knows must keep its type
    wrong = sorted(k for k, v in state["schedule"].items() if k in own and type(v) is not type(own[k]))
    if wrong or "last_epoch" not in state["schedule"]:
        raise RefusedFileError(f"{path}: damaged training checkpoint (schedule: {', '.join(wrong) or 'no last_epoch'})")
    part = "modules"
    try:
        for part, module in modules.items():
            module.load_state_dict(state["modules"][part])
        part = "optimizer"
        optimizer.load_state_dict(state["optimizer"])
        for group in optimizer.param_groups:
            for p in group["params"]:
                for value in optimizer.state.get(p, {}).values():
                    if isinstance(value, Tensor) and value.dim() and value.shape != p.shape:
                        raise ValueError(f"a state of shape {list(value.shape)} for a parameter of {list(p.shape)}")
        part = "schedule"
        schedule.load_state_dict(state["schedule"])
    except Exception as err:  # torch's load_state_dict raises several types for state of another shape
        raise RefusedFileError(f"{path}: damaged training checkpoint ({part}: {' '.join(str(err).split())[:300]})") \
            from err
    return epoch, list(history)


def train_decoder(decoder: nn.Module, encoder: nn.Module, images: Images, epochs: int = 10, batch_size: int = 64,
                  lr: float = 2e-3, normalize: bool = True, seed: int = 0, checkpoint: str | os.PathLike | None = None,
                  output: str | os.PathLike | None = None, progress: bool = True,
                  identity_weight: float = 0.0) -> list[float]:
    """Train ``decoder`` to invert ``encoder``: min sum_i ||x_i - D(E(x_i))||_1 (Eq. 1; mean per pixel).

    Used for the server's shadow model S and for attacker networks R. Features that are not finite or
    have no direction are refused (``check_training_features``). ``identity_weight`` w > 0
    adds w * (1 - cos(E(D(z)), z)) through the frozen encoder (the server owns E): a shadow whose
    images E recognises as the same person, so that the anchor E(S(z)) of Eq. 5 stays close to z
    (docs/evaluation.md); w = 0 is Eq. 1 as the poster writes it. ``checkpoint`` makes the run
    resumable, its features cached beside it (``_features``); ``output`` receives the final weights as a
    safetensors model file. Returns the per-epoch mean loss (the L1 term, plus the identity term when weighted).
    """
    if identity_weight < 0:
        raise ValueError(f"identity_weight must be >= 0, got {identity_weight}")
    torch.manual_seed(seed)
    device = next(decoder.parameters()).device
    key = {"data": data_checksum(images), "encoder": model_checksum(encoder)}
    z = _features(encoder, images, normalize, key, checkpoint).to(device)
    x = _Batches(images, device)

    def loss_fn(idx: Tensor, gen: torch.Generator) -> Tensor:
        y = decoder(z[idx])
        loss = (y - x(idx)).abs().mean()
        if identity_weight:
            loss = loss + identity_weight * (1 - F.cosine_similarity(encoder(y), z[idx]).mean())
        return loss

    settings = {**key, "normalize": normalize, "identity_weight": identity_weight}
    with frozen(encoder):
        history = _fit({"decoder": decoder}, loss_fn, len(images), epochs, batch_size, lr, seed, checkpoint,
                       "train decoder", progress, settings, x.prefetch)
    if output is not None:
        save_model(decoder, output, extra={"trained_for": "decoder", "epochs": epochs, "loss": history[-1],
                                           "normalize": normalize, "identity_weight": identity_weight})
    return history


class CosFaceHead(nn.Module):
    """Large-margin cosine classifier used to train encoders: s * (cos(theta_y) - m)."""

    def __init__(self, num_features: int, num_classes: int, s: float = 30.0, m: float = 0.25):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_classes, num_features) * 0.01)
        self.s, self.m = s, m

    def forward(self, z: Tensor, labels: Tensor) -> Tensor:
        cos = F.normalize(z, dim=1) @ F.normalize(self.weight, dim=1).t()
        logits = self.s * (cos - self.m * F.one_hot(labels, cos.shape[1]))
        return F.cross_entropy(logits, labels)


def train_encoder(encoder: nn.Module, images: Images, labels: Tensor, epochs: int = 10, batch_size: int = 128,
                  lr: float = 2e-3, seed: int = 0, checkpoint: str | os.PathLike | None = None,
                  output: str | os.PathLike | None = None, progress: bool = True) -> list[float]:
    """Train a recognition encoder with a CosFace head on identity-labelled faces (random flips)."""
    if len(images) == 0:
        raise ValueError("no training data")
    torch.manual_seed(seed)
    device = next(encoder.parameters()).device
    labels = torch.as_tensor(labels)
    classes, y = torch.unique(labels, return_inverse=True)
    with torch.no_grad():
        dim = encoder.eval()(take(images, range(min(2, len(images)))).to(device)).shape[1]
    head = CosFaceHead(dim, len(classes)).to(device)
    x, y = _Batches(images, device), y.to(device)

    def loss_fn(idx: Tensor, gen: torch.Generator) -> Tensor:
        batch = x(idx)
        flip = (torch.rand(len(idx), generator=gen) < 0.5).to(device)
        batch = torch.where(flip.view(-1, 1, 1, 1), batch.flip(-1), batch)
        return head(encoder(batch), y[idx])

    history = _fit({"encoder": encoder, "head": head}, loss_fn, len(images), epochs, batch_size, lr, seed, checkpoint,
                   "train encoder", progress, {"data": data_checksum(images, labels)}, x.prefetch)
    if output is not None:
        save_model(encoder, output, extra={"trained_for": "encoder", "epochs": epochs, "loss": history[-1]})
    return history
