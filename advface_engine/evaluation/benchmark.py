"""The whole evaluation: train (or load) the models, protect a gallery, attack it, measure.

``run_evaluation(settings)`` returns a JSON-ready dict with every figure and, under the key
"artifacts", the images the report draws (removed before the JSON is written). Identities are
disjoint: the server's encoder and shadow models train on identities [0, n), the attackers on
their own identities from ATTACKER_FIRST, and the evaluated gallery starts at GALLERY_FIRST.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import time
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ProtectConfig
from ..data import synthetic_faces
from ..devices import resolve_device
from ..models import ARCHITECTURES, DECODERS, ENCODERS, IResNet, build_model, load_model
from ..models.io import read_metadata
from ..progress import progress_bar
from ..protect import Protector
from ..train import train_decoder, train_encoder
from .attack import identity_inference
from .baselines import dp_baseline, dp_epsilon, dp_scale, random_baseline
from .datasets import VerificationSet, folder_set, read_bin, synthetic_set
from .quality import reconstruction_quality
from .verification import embed, verification_accuracy

ATTACKER_FIRST = 100_000
GALLERY_FIRST = 200_000
METHODS = ("unprotected", "random", "dp", "advface")


@dataclass
class EvalSettings:
    """Everything a run depends on; ``SCALES`` holds the named presets. Sizes are images per side."""

    scale: str = "small"
    size: int = 32
    feature_dim: int = 128
    encoder_arch: str = "mobilefacenet"
    encoder_width: int = 16
    decoder_width: int = 16
    train_identities: int = 400
    train_per_identity: int = 10
    encoder_epochs: int = 8
    decoder_epochs: int = 10
    batch_size: int | None = None  # None: the training functions' defaults
    attacker_identities: int = 200
    attacker_per_identity: int = 10
    gallery_identities: int = 100
    gallery_per_identity: int = 10
    pairs_per_fold: int = 300
    shadow: str = "dcgan"
    shadow_identity_weight: float = 0.0  # train_decoder's identity term for the shadows (0: Eq. 1 alone)
    families: tuple[str, ...] = ("dcgan", "nbnet", "upconv")
    protect: dict = field(default_factory=dict)
    sweep_eps: tuple[float, ...] = (0.01, 0.02, 0.03, 0.05, 0.08, 0.1)
    sweep_steps: tuple[int, ...] = ()
    flip: bool = False
    seed: int = 0
    backend: str = "auto"
    device: str = "auto"
    max_verification_loss: float = 0.5
    grid_rows: int = 8
    bin: str | None = None
    folder: str | None = None
    pairs: str | None = None
    encoder_checkpoint: str | None = None
    shadow_checkpoint: str | None = None

    def config(self) -> ProtectConfig:
        return ProtectConfig.from_dict(self.protect)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SCALES = {
    # seconds on a CPU; the tests' size
    "tiny": dict(feature_dim=64, encoder_width=8, decoder_width=8, batch_size=32, train_identities=100,
                 train_per_identity=8, encoder_epochs=8, decoder_epochs=5, attacker_identities=60,
                 attacker_per_identity=6, gallery_identities=40, gallery_per_identity=5, pairs_per_fold=40,
                 families=("dcgan", "upconv"), sweep_eps=(0.03, 0.1), grid_rows=4),
    # the CPU demo scale (advface_engine.demo.DEMO): minutes on a CPU
    "small": dict(),
    # a GPU run at the usual face size
    "large": dict(size=112, feature_dim=512, encoder_width=32, decoder_width=32, train_identities=2000,
                  train_per_identity=20, encoder_epochs=20, decoder_epochs=20, attacker_identities=1000,
                  attacker_per_identity=20, gallery_identities=600, gallery_per_identity=10, pairs_per_fold=600),
}


def settings_for(scale: str = "small", **overrides) -> EvalSettings:
    """The preset ``scale`` with some fields replaced, type-checked, and checked against the files and
    device they name before any training (unknown names, wrong types, missing files are ValueErrors).
    An encoder checkpoint sets feature_dim, size and the encoder fields from its header."""
    if not isinstance(scale, str) or scale not in SCALES:
        raise ValueError(f"scale must be one of {sorted(SCALES)}, got {scale!r}")
    hints = typing.get_type_hints(EvalSettings)
    unknown = set(overrides) - set(hints)
    if unknown:
        raise ValueError(f"unknown evaluation settings: {sorted(unknown)}")
    values = {**SCALES[scale], **{k: v for k, v in overrides.items() if v is not None}}
    values = {name: _typed(name, value, hints[name]) for name, value in values.items()}
    if values.get("encoder_checkpoint"):
        values.update(_encoder_fields(values["encoder_checkpoint"]))
    settings = EvalSettings(scale=scale, **values)
    try:
        settings.config()  # validates the protection fields
    except TypeError as err:
        raise ValueError(f"protect: {err}") from err
    for arch in (settings.shadow, *settings.families):
        if arch not in DECODERS:
            raise ValueError(f"unknown decoder family {arch!r}; known: {sorted(DECODERS)}")
    if settings.shadow not in settings.families:
        raise ValueError(f"the shadow family {settings.shadow!r} must be one of families {settings.families}")
    _check_inputs(settings)
    return settings


_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "an object"}
_LIST_NAMES = {int: "integers", float: "numbers", str: "strings"}


def _typed(name: str, value, hint):
    """``value`` as field ``name`` of type ``hint`` (a list becomes a tuple, an int a float), else a ValueError."""
    try:
        return _as_type(value, hint)
    except TypeError:
        raise ValueError(f"setting {name!r} must be {_type_name(hint)}, got {value!r}") from None


def _as_type(value, hint):
    """``value`` converted to ``hint``, or a TypeError."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):  # X | None
        return None if value is None else _as_type(value, next(a for a in args if a is not type(None)))
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise TypeError
        return tuple(_as_type(v, args[0]) for v in value)
    if isinstance(value, bool) and hint is not bool:  # JSON true is no number
        raise TypeError
    if hint is float and isinstance(value, int):
        return float(value)
    if not isinstance(value, hint):
        raise TypeError
    return value


def _type_name(hint) -> str:
    args = typing.get_args(hint)
    if typing.get_origin(hint) is tuple:
        return f"a list of {_LIST_NAMES[args[0]]}"
    if type(None) in args:
        return f"{_type_name(next(a for a in args if a is not type(None)))} or null"
    return _TYPE_NAMES[hint]


def _header(flag: str, path: str) -> tuple[str, dict]:
    """(arch, arguments with the architecture's defaults filled in) of the advface checkpoint given as ``flag``."""
    if not Path(path).is_file():
        raise ValueError(f"{flag}: no file at {path}")
    meta = read_metadata(path)
    arch = meta["arch"]
    if arch not in ARCHITECTURES:
        raise ValueError(f"{flag} {path} holds an unknown architecture {arch!r}")
    factory = IResNet if arch.startswith("iresnet") else ARCHITECTURES[arch]
    defaults = {k: p.default for k, p in inspect.signature(factory).parameters.items() if p.default is not p.empty}
    return arch, {**defaults, **meta["kwargs"]}


def _encoder_fields(path: str) -> dict:
    """The settings an encoder checkpoint fixes: its feature size, image size and architecture."""
    arch, kwargs = _header("--encoder-checkpoint", path)
    if arch not in ENCODERS:
        raise ValueError(f"--encoder-checkpoint {path} holds a {arch!r} model, not an encoder ({sorted(ENCODERS)})")
    fields = dict(feature_dim=kwargs["num_features"], size=kwargs["input_size"], encoder_arch=arch)
    return {**fields, "encoder_width": kwargs["width"]} if "width" in kwargs else fields


def _check_inputs(s: EvalSettings) -> None:
    """One-line errors, before any training, for the files, folders and device the settings name: a .bin
    through the restricted reader with its images' headers (nothing decoded), the pair file, and the
    shadow checkpoint's header and tensors (the encoder checkpoint is loaded before any training)."""
    from ..models.io import check_checkpoint
    from .datasets import check_bin, read_pair_file

    if s.bin and s.folder:
        raise ValueError("give --bin or --folder, not both")
    if s.pairs and not s.folder:
        raise ValueError("--pairs is a pair file for --folder: give --folder as well")
    for flag, path, exists in (("--bin", s.bin, os.path.isfile), ("--folder", s.folder, os.path.isdir),
                               ("--pairs", s.pairs, os.path.isfile)):
        if path and not exists(path):
            raise ValueError(f"{flag}: no {'folder' if flag == '--folder' else 'file'} at {path}")
    if s.bin:
        check_bin(s.bin)
    if s.pairs:
        read_pair_file(s.pairs)
    if s.shadow_checkpoint:
        arch, kwargs = _header("--shadow-checkpoint", s.shadow_checkpoint)
        if arch not in DECODERS:
            raise ValueError(f"--shadow-checkpoint {s.shadow_checkpoint} holds a {arch!r} model, not a decoder")
        if arch != s.shadow:
            raise ValueError(f"--shadow-checkpoint {s.shadow_checkpoint} holds a {arch!r} decoder, but the shadow "
                             f"family is {s.shadow!r}: pass --shadow {arch}")
        if (kwargs["feature_dim"], kwargs["size"]) != (s.feature_dim, s.size):
            raise ValueError(f"--shadow-checkpoint {s.shadow_checkpoint} has feature_dim {kwargs['feature_dim']}, "
                             f"size {kwargs['size']}, but the encoder has feature_dim {s.feature_dim}, size {s.size}")
        check_checkpoint(s.shadow_checkpoint)
    try:
        resolve_device(s.device)
    except ValueError as err:
        raise ValueError(f"--device: {err} (use auto, cpu or cuda)") from None


def load_settings(path: str | os.PathLike, **overrides) -> EvalSettings:
    """Settings from a JSON file ({"scale": ..., field: value, "protect": {...}}), then ``overrides``."""
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object of evaluation settings")
    data.update({k: v for k, v in overrides.items() if v is not None})
    return settings_for(data.pop("scale", "small"), **data)


def _verification_set(s: EvalSettings) -> VerificationSet:
    if s.bin:
        return read_bin(s.bin, size=s.size)
    if s.folder:
        return folder_set(s.folder, s.size, s.pairs, s.pairs_per_fold, s.seed)
    return synthetic_set(s.gallery_identities, s.gallery_per_identity, s.size, s.pairs_per_fold,
                         first_identity=GALLERY_FIRST, seed=s.seed)


class Run:
    """The trained models and the clean features of one evaluation."""

    def __init__(self, s: EvalSettings, progress: bool = True):
        self.s, self.progress, self.device = s, progress, resolve_device(s.device)
        self.timings: dict[str, float] = {}
        self.training: dict[str, float] = {}
        self.encoder = self._encoder()
        self.shadows = {f: load_model(s.shadow_checkpoint, self.device) if s.shadow_checkpoint and f == s.shadow
                        else self._decoder(f, "shadow", self.server_images) for f in s.families}
        attacker_images, _ = synthetic_faces(s.attacker_identities, s.attacker_per_identity, s.size, seed=s.seed,
                                             first_identity=ATTACKER_FIRST)
        self.attackers = {f: self._decoder(f, "attacker", attacker_images) for f in s.families}
        self.data = _verification_set(s)
        self.z = embed(self.encoder, self.data.images, flip=s.flip)
        self.left, self.right = torch.as_tensor(self.data.left), torch.as_tensor(self.data.right)
        positive = self.data.issame
        self.stored, self.other = self.left[positive], self.right[positive]
        self.clean = verification_accuracy(self.z[self.left], self.z[self.right], self.data.issame)
        self.threshold = self.clean["threshold"]

    def _timed(self, key: str, fn):
        start = time.perf_counter()
        out = fn()
        self.timings[key] = round(time.perf_counter() - start, 2)
        return out

    def _batch(self) -> dict:
        return {"batch_size": self.s.batch_size} if self.s.batch_size else {}

    def _encoder(self) -> nn.Module:
        s = self.s
        self.server_images, labels = synthetic_faces(s.train_identities, s.train_per_identity, s.size, seed=s.seed)
        if s.encoder_checkpoint:
            return load_model(s.encoder_checkpoint, self.device)
        torch.manual_seed(s.seed)
        kwargs = dict(num_features=s.feature_dim, input_size=s.size)
        if s.encoder_arch == "mobilefacenet":
            kwargs["width"] = s.encoder_width
        encoder = build_model(s.encoder_arch, **kwargs).to(self.device)
        history = self._timed("train encoder", lambda: train_encoder(
            encoder, self.server_images, labels, epochs=s.encoder_epochs, seed=s.seed, progress=self.progress,
            **self._batch()))
        self.training["encoder loss"] = history[-1]
        return encoder.eval()

    def _decoder(self, family: str, role: str, images: Tensor) -> nn.Module:
        s = self.s
        seed = s.seed + (1 if role == "shadow" else 2)
        torch.manual_seed(seed)
        decoder = build_model(family, feature_dim=s.feature_dim, size=s.size, width=s.decoder_width).to(self.device)
        weight = s.shadow_identity_weight if role == "shadow" else 0.0  # attackers: Eq. 1, as the threat model
        history = self._timed(f"train {role} {family}", lambda: train_decoder(
            decoder, self.encoder, images, epochs=s.decoder_epochs, seed=seed, normalize=True,
            progress=self.progress, identity_weight=weight, **self._batch()))
        self.training[f"{role} {family} loss"] = history[-1]
        return decoder.eval()

    def protect(self, config: ProtectConfig, shadow: str | None = None, batch_size: int = 1024) -> Tensor:
        """AdvFace features of every image (the stored gallery), in batches."""
        protector = Protector(self.shadows[shadow or self.s.shadow], self.encoder, config, backend=self.s.backend)
        z = self.z.to(self.device)
        return torch.cat([protector(z[i:i + batch_size]).cpu() for i in range(0, len(z), batch_size)])

    def baseline(self, method: str, config: ProtectConfig) -> Tensor:
        """Stored features of ``method`` ("unprotected", "random", "dp", "advface") at ``config``'s budget."""
        if method == "unprotected":
            return self.z
        if method == "advface":
            return self.protect(config)
        if method == "random":
            z = self.z.to(self.device)
            return random_baseline(z, self.shadows[self.s.shadow], self.encoder, config, seed=self.s.seed).cpu()
        if method == "dp":
            return dp_baseline(self.z, config.eps, normalize=config.normalize, seed=self.s.seed, norm=config.norm)
        raise ValueError(f"unknown method {method!r}")

    def verification(self, stored: Tensor) -> dict:
        """Offline (gallery side protected, probe clean) and online (both protected) 10-fold accuracy."""
        offline = verification_accuracy(stored[self.left], self.z[self.right], self.data.issame)
        online = verification_accuracy(stored[self.left], stored[self.right], self.data.issame)
        return {"offline": offline, "online": online}

    def attack(self, stored: Tensor, family: str, quality: bool = False) -> tuple[dict, Tensor]:
        """Identity inference by the ``family`` attacker on the stored features of positive pairs' left images."""
        result, images = identity_inference(self.attackers[family], self.encoder, stored[self.stored],
                                            self.z[self.other], self.z[self.stored], self.threshold, self.s.flip)
        if quality:
            result.update(reconstruction_quality(images, self.data.images[self.stored]))
        return result, images


def _cross_family(s: EvalSettings) -> list[str]:
    return [f for f in s.families if f != s.shadow] or list(s.families)


def run_evaluation(s: EvalSettings, progress: bool = True) -> dict:
    """All figures of the evaluation (see the module docstring); percentages are fractions in [0, 1]."""
    start = time.perf_counter()
    config = s.config()
    run = Run(s, progress)
    cross = _cross_family(s)
    results: dict = {
        "label": "synthetic" if not (s.bin or s.folder) else run.data.name,
        "settings": s.to_dict(),
        "config": config.to_dict(),
        "device": str(run.device),
        "data": {"gallery images": len(run.data.images), "pairs": len(run.data.issame),
                 "stored features attacked": len(run.stored)},
        "threshold": run.threshold,
        "threshold_rule": "the mean of the ten per-fold thresholds of the clean 10-fold verification",
        "dp": {"norm": config.norm, "laplace_scale": dp_scale(config.eps, s.feature_dim, config.norm),
               "sensitivity_l1": 2 * s.feature_dim ** 0.5,
               "epsilon": dp_epsilon(config.eps, s.feature_dim, config.norm)},
        "verification": {"clean": run.clean},
        "identity_inference": {},
        "cross_family_attackers": cross,
    }
    grids = {}
    stored_by_method = {}
    for method in progress_bar(METHODS, progress=progress, desc="methods", leave=False):
        stored = run._timed(f"protect {method}", lambda m=method: run.baseline(m, config))
        stored_by_method[method] = stored
        results["verification"][method] = run.verification(stored)
        attacks = {}
        for family in s.families:
            attacks[family], images = run.attack(stored, family, quality=True)
            grids.setdefault(family, {})[method] = images[: s.grid_rows]
        attacks["cross_family_mean"] = {k: float(np.mean([attacks[f][k] for f in cross]))
                                        for k in ("success", "success_self")}
        results["identity_inference"][method] = attacks
    n = len(run.z)
    results["throughput"] = {"advface features per second": n / max(run.timings["protect advface"], 1e-9),
                             "backend": Protector(run.shadows[s.shadow], run.encoder, config, s.backend).backend_name}
    transfer = {}
    for shadow in progress_bar(s.families, progress=progress, desc="transfer", leave=False):
        stored = stored_by_method["advface"] if shadow == s.shadow else run.protect(config, shadow)
        transfer[shadow] = {f: run.attack(stored, f)[0]["success"] for f in s.families}
    results["transfer"] = transfer
    anchors = run.protect(config.replace(steps=0))
    results["anchor_only"] = {**point(run, anchors, cross),  # how near the shadow's anchor E(S(z)) is to z
                              "cosine": float(F.cosine_similarity(anchors, run.z, dim=1).mean())}
    results["sweep"] = sweep(run, config, cross, progress)
    results["recommended"] = recommend(results["sweep"], run.clean["accuracy"], results["anchor_only"]["offline"],
                                       s.max_verification_loss)
    results["timings"] = {**run.timings, "total": round(time.perf_counter() - start, 2)}
    results["training"] = run.training
    results["artifacts"] = {
        "originals": run.data.images[run.stored[: s.grid_rows]],
        "grids": grids,
    }
    return results


def point(run: Run, stored: Tensor, cross: list[str]) -> dict:
    """Offline and online accuracy and the cross-family attack success of one set of stored features."""
    verification = run.verification(stored)
    success = [run.attack(stored, f)[0]["success"] for f in cross]
    return {"offline": verification["offline"]["accuracy"], "online": verification["online"]["accuracy"],
            "attack_success": float(np.mean(success))}


def sweep(run: Run, config: ProtectConfig, cross: list[str], progress: bool = True) -> list[dict]:
    """Privacy/utility points over eps (alpha keeps config's alpha/eps ratio) and steps; baselines per eps."""
    s = run.s
    ratio = config.alpha / config.eps
    grid = [("advface", eps, steps) for steps in (s.sweep_steps or (config.steps,)) for eps in s.sweep_eps]
    grid += [(method, eps, None) for method in ("random", "dp") for eps in s.sweep_eps]
    points = []
    for method, eps, steps in progress_bar(grid, progress=progress, desc="sweep", leave=False):
        cfg = config.replace(eps=eps, alpha=eps * ratio, steps=config.steps if steps is None else steps)
        points.append({"method": method, "eps": eps, "alpha": cfg.alpha if steps else None, "steps": steps,
                       **point(run, run.baseline(method, cfg), cross)})
    return points


def recommend(points: list[dict], clean_accuracy: float, anchor_accuracy: float, max_loss_points: float = 0.5) -> dict:
    """The AdvFace sweep point with the lowest cross-family attack success (ties: smaller eps, fewer steps)
    whose offline accuracy is within ``max_loss_points`` percentage points of (a) clean features and
    (b) the anchor alone (steps 0, Eq. 5), i.e. the loss the perturbation adds; None where none is."""

    def best(reference: float) -> dict | None:
        ok = [p for p in points if p["method"] == "advface" and p["steps"]
              and (reference - p["offline"]) * 100 <= max_loss_points]
        return min(ok, key=lambda p: (p["attack_success"], p["eps"], p["steps"])) if ok else None

    return {"within_clean": best(clean_accuracy), "within_anchor": best(anchor_accuracy)}
