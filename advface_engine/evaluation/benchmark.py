"""The paper's evaluation (``advface eval``), whole: train (or load) the models, protect a gallery, attack
it, measure. "Benchmark" here is the paper's sense; speed measurements are advface_engine.speed and bench/.

``run_evaluation(settings)`` returns a JSON-ready dict with every figure and, under the key
"artifacts", the images the report draws (removed before the JSON is written). Identities are
disjoint: the server's encoder and shadow models train on identities [0, n), the attackers on
their own identities from ATTACKER_FIRST, the evaluated gallery starts at GALLERY_FIRST, and the
mismatch scenario's shadow trains on MISMATCH_FIRST onwards, rendered with another seed, in grey.

Each training seed is one ``Run`` (its own faces, encoder, shadows and attackers); a figure over
several seeds is the mean of the per-seed figures, and its interval comes from the paired
bootstrap of ``bootstrap.py`` (pairs resampled within each fold, the same resample for clean and
protected features). A sweep over protection configs reuses each seed's trained models; only the
adaptive attacker depends on the config, so it is trained for the evaluated config alone.
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
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

from ..backends.reference import shadow_targets
from ..config import ANCHORS, OBJECTIVES, ProtectConfig
from ..data import synthetic_faces
from ..devices import resolve_device
from ..models import ARCHITECTURES, DECODERS, ENCODERS, IResNet, build_model, load_model
from ..models.io import read_metadata
from ..principal import principal_directions, variance_share
from ..progress import progress_bar
from ..protect import Protector
from ..train import train_decoder, train_encoder
from .attack import ProtectedEncoder, ResidualUpDecoder, attack_hits
from .baselines import dp_baseline, dp_epsilon, dp_scale, random_baseline
from .bootstrap import bootstrap_interval, resample_counts
from .datasets import VerificationSet, folder_set, read_bin, synthetic_set
from .quality import reconstruction_quality
from .verification import (
    best_balanced_accuracy,
    cosine_scores,
    embed,
    gallery_histograms,
    resampled_accuracy,
    resampled_gallery_accuracy,
    ten_fold_accuracy,
)

ATTACKER_FIRST = 100_000
GALLERY_FIRST = 200_000
MISMATCH_FIRST = 300_000
SHADOW_COPY_SEED = 20  # an ensemble's k-th shadow of one family trains with seed + 1 + 20 k (the first: seed + 1)
MISMATCH_SEED = 7919  # added to the run's seed: the mismatch shadow's faces come from another render seed
FOLDS = 10
METHODS = ("unprotected", "random", "dp", "advface")
STRONG, ADAPTIVE = "strong", "adaptive"  # attackers beside the decoder families


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
    num_seeds: int = 1  # training seeds seed, seed + 1, ...: every model and the data drawn again
    shadow: str = "dcgan"
    shadow_identity_weight: float = 0.0  # train_decoder's identity term for the shadows (0: Eq. 1 alone)
    families: tuple[str, ...] = ("dcgan", "nbnet", "upconv")
    transfer: bool = True  # the shadow set x attacker matrix (a shadow of every family, and ensembles of them)
    ensembles: tuple[tuple[str, ...], ...] | None = None  # its ensembles; None: the shadow's family with 1, 2, ..
    transfer_objectives: tuple[str, ...] = ("pixel",)  # each row of the matrix protected with each objective
    strong_attacker: bool = True  # ResidualUpDecoder, never a shadow
    strong_width: int | None = None  # None: twice decoder_width
    strong_epochs: int | None = None  # None: 1.5 x decoder_epochs
    adaptive_attacker: bool = True  # own shadow, own protected features, for the evaluated config
    adaptive_family: str = "upconv"  # its reconstruction network (the same family's plain attacker is beside it)
    mismatch: bool = True  # the scenario of a shadow trained on other faces than the gallery's
    mismatch_identities: int = 40
    mismatch_per_identity: int = 5
    protect: dict = field(default_factory=dict)
    # k > 0: the steps kept out of the top k principal directions of the clean gallery's features; "auto": as
    # many as hold principal.AUTO_SHARE of their variance (per seed), as the gallery job's keep_out="auto"
    keep_out: int | str = 0
    sweep_eps: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3)
    sweep_steps: tuple[int, ...] = ()  # every sweep axis gets the config's own value added
    sweep_min_cosine: tuple[float | None, ...] = (0.8, 0.9, None)
    sweep_anchor: tuple[str, ...] = ()
    sweep_objective: tuple[str, ...] = ()
    sweep_identity_weight: tuple[float, ...] = ()
    sweep_grids: tuple[dict, ...] = ()  # further grids, each {axis field: values}: a product of its own axes
    replicates: int = 1000  # bootstrap resamples of every interval
    flip: bool = False
    seed: int = 0
    backend: str = "auto"
    device: str = "auto"
    max_verification_loss: float = 0.5  # percentage points: the recommendation's bound on the CI's upper end
    grid_rows: int = 8
    quality_rows: int = 500  # attacked features per seed whose reconstructions get L1 / PSNR / SSIM
    bin: str | None = None
    folder: str | None = None
    pairs: str | None = None
    encoder_checkpoint: str | None = None
    shadow_checkpoint: str | None = None

    def config(self) -> ProtectConfig:
        return ProtectConfig.from_dict(self.protect)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def seeds(self) -> list[int]:
        return [self.seed + k for k in range(self.num_seeds)]


SCALES = {
    # seconds on a CPU; the tests' size. Its figures mean nothing (the report says so)
    "tiny": dict(feature_dim=64, encoder_width=8, decoder_width=8, batch_size=32, train_identities=100,
                 train_per_identity=8, encoder_epochs=8, decoder_epochs=5, attacker_identities=60,
                 attacker_per_identity=6, gallery_identities=40, gallery_per_identity=5, pairs_per_fold=40,
                 families=("dcgan", "upconv"), strong_epochs=5, mismatch_identities=20, mismatch_per_identity=3,
                 sweep_eps=(0.03, 0.1), sweep_min_cosine=(0.8, None), replicates=200, grid_rows=4),
    # the CPU demo scale (advface_engine.demo.DEMO): minutes on a CPU, one seed
    "small": dict(),
    # small's models over three seeds, a larger gallery and no transfer matrix: <= 30 min on 2 CPU cores,
    # intervals narrow enough to tell half a point (the report states the half-width)
    "medium": dict(num_seeds=3, gallery_identities=300, gallery_per_identity=8, pairs_per_fold=600, transfer=False,
                   sweep_eps=(0.1, 0.3), sweep_min_cosine=(0.8, 0.9, None)),
    # a GPU run at the usual face size
    "large": dict(size=112, feature_dim=512, encoder_width=32, decoder_width=32, train_identities=2000,
                  train_per_identity=20, encoder_epochs=20, decoder_epochs=20, attacker_identities=1000,
                  attacker_per_identity=20, gallery_identities=600, gallery_per_identity=10, pairs_per_fold=600),
}

# Named sweeps (``--sweep NAME``): the grid that chose ProtectConfig's defaults (docs/evaluation.md).
_GUARDS = (0.8, 0.85, 0.875, 0.9, 0.925, 0.95, None)
SWEEPS = {
    # eps x guard at the config's steps, anchor and shadow; then the guards against the shadow's identity
    # weight, against the anchor, and against steps (the full product would take hours on a CPU)
    "defaults": dict(sweep_eps=(0.05, 0.1, 0.2, 0.3), sweep_min_cosine=_GUARDS, sweep_grids=(
        dict(sweep_identity_weight=(1.0,), sweep_eps=(0.1, 0.2, 0.3), sweep_min_cosine=_GUARDS),
        dict(sweep_anchor=("original",), sweep_eps=(0.1, 0.2, 0.3), sweep_min_cosine=_GUARDS),
        dict(sweep_steps=(5, 20), sweep_min_cosine=(0.85, 0.9, 0.95)))),
    # the objectives (Eq. 4's pixel L1, the identity term, both) at the guards that keep half a point, with
    # the shadow's anchor and with the original one; run with the config it is to judge (docs/evaluation.md)
    "objective": dict(sweep_objective=("pixel", "identity"), sweep_eps=(0.1, 0.2),
                      sweep_min_cosine=(0.8, 0.85, 0.875, 0.9), sweep_grids=(
        dict(sweep_objective=("pixel+identity",), sweep_min_cosine=(0.85, 0.875, 0.9)),
        dict(sweep_objective=("identity",), sweep_anchor=("original",), sweep_min_cosine=(0.85, 0.875, 0.9)))),
}
SWEEP_AXES = ("sweep_eps", "sweep_steps", "sweep_min_cosine", "sweep_anchor", "sweep_objective",
              "sweep_identity_weight")


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
    for grid in values.get("sweep_grids", ()):
        unknown = set(grid) - set(SWEEP_AXES)
        if unknown:
            raise ValueError(f"sweep_grids: unknown axes {sorted(unknown)}; known: {list(SWEEP_AXES)}")
    if "sweep_grids" in values:
        values["sweep_grids"] = tuple({k: _typed(f"sweep_grids {k}", v, hints[k]) for k, v in grid.items()}
                                      for grid in values["sweep_grids"])
    if values.get("encoder_checkpoint"):
        values.update(_encoder_fields(values["encoder_checkpoint"]))
    settings = EvalSettings(scale=scale, **values)
    try:
        settings.config()  # validates the protection fields
    except TypeError as err:
        raise ValueError(f"protect: {err}") from err
    for arch in (settings.shadow, settings.adaptive_family, *settings.families):
        if arch not in DECODERS:
            raise ValueError(f"unknown decoder family {arch!r}; known: {sorted(DECODERS)}")
    if settings.shadow not in settings.families:
        raise ValueError(f"the shadow family {settings.shadow!r} must be one of families {settings.families}")
    for ensemble in settings.ensembles or ():
        if len(ensemble) < 2 or not set(ensemble) <= set(DECODERS):
            raise ValueError(f"ensembles: {'+'.join(ensemble)!r} is not two or more decoder families "
                             f"({sorted(DECODERS)}; a family repeated is trained again with another seed)")
    for objective in settings.transfer_objectives:
        if objective not in OBJECTIVES:
            raise ValueError(f"transfer_objectives: unknown objective {objective!r}; known: {OBJECTIVES}")
    for grid in ({name: getattr(settings, name) for name in SWEEP_AXES}, *settings.sweep_grids):
        for anchor in grid.get("sweep_anchor", ()):
            if anchor not in ANCHORS:
                raise ValueError(f"sweep_anchor: unknown anchor {anchor!r}; known: {ANCHORS}")
        for objective in grid.get("sweep_objective", ()):
            if objective not in OBJECTIVES:
                raise ValueError(f"sweep_objective: unknown objective {objective!r}; known: {OBJECTIVES}")
        for c in grid.get("sweep_min_cosine", ()):
            if c is not None and not -1 < c < 1:
                raise ValueError(f"sweep_min_cosine: {c} is not in (-1, 1) (null: no guard)")
    for name in ("num_seeds", "replicates"):
        if getattr(settings, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(settings, name)}")
    if settings.keep_out != "auto" and not (isinstance(settings.keep_out, int)
                                             and 0 <= settings.keep_out < settings.feature_dim):
        raise ValueError(f"keep_out must be 'auto' or in [0, {settings.feature_dim - 1}] (below the feature dim "
                         f"{settings.feature_dim}; 0: off), got {settings.keep_out!r}")
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
    if origin in (types.UnionType, typing.Union):  # X | None, X | Y: the first that takes the value
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _as_type(value, arg)
            except TypeError:
                pass
        raise TypeError
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
        if typing.get_origin(args[0]) in (types.UnionType, typing.Union):
            return "a list of numbers or nulls"
        if args[0] is dict:
            return "a list of objects"
        if typing.get_origin(args[0]) is tuple:
            return "a list of lists of strings"
        return f"a list of {_LIST_NAMES[args[0]]}"
    if args:  # a union
        return " or ".join(_type_name(a) if a is not type(None) else "null" for a in args)
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
    arch, kwargs = _header("--encoder", path)
    if arch not in ENCODERS:
        raise ValueError(f"--encoder {path} holds a {arch!r} model, not an encoder ({sorted(ENCODERS)})")
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
        arch, kwargs = _header("--shadow", s.shadow_checkpoint)
        if arch not in DECODERS:
            raise ValueError(f"--shadow {s.shadow_checkpoint} holds a {arch!r} model, not a decoder")
        if arch != s.shadow:
            raise ValueError(f"--shadow {s.shadow_checkpoint} holds a {arch!r} decoder, but the shadow "
                             f"family is {s.shadow!r}: pass --shadow-arch {arch}")
        if (kwargs["feature_dim"], kwargs["size"]) != (s.feature_dim, s.size):
            raise ValueError(f"--shadow {s.shadow_checkpoint} has feature_dim {kwargs['feature_dim']}, "
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


def fold_labels(n: int, folds: int = FOLDS) -> np.ndarray:
    """The fold of each of n pairs: contiguous folds, as the 10-fold protocol splits them."""
    return np.concatenate([np.full(len(part), f) for f, part in enumerate(np.array_split(np.arange(n), folds))])


@dataclass
class Measurement:
    """One set of stored features on one run: the cosine score of every pair (offline: stored gallery
    side, clean probe; online: both sides stored) and, per attacker, which attacked features (the
    positive pairs' gallery side) it re-identified."""

    offline: np.ndarray
    online: np.ndarray
    gallery: float | None = None  # gallery_accuracy offline, where the images' identities are known
    gallery_replicates: np.ndarray | None = None  # its value on each of the run's identity resamples
    hits: dict[str, np.ndarray] = field(default_factory=dict)
    hits_self: dict[str, np.ndarray] = field(default_factory=dict)
    quality: dict[str, dict] = field(default_factory=dict)
    images: dict[str, Tensor] = field(default_factory=dict)


class Run:
    """The trained models, clean features and bootstrap resamples of one training seed (``s.seed``)."""

    def __init__(self, s: EvalSettings, progress: bool = True):
        self.s, self.progress, self.device = s, progress, resolve_device(s.device)
        self.timings: dict[str, float] = {}
        self.training: dict[str, float] = {}
        self.encoder = self._encoder()
        self._shadows: dict[tuple[str, float], nn.Module] = {}
        self._mismatch: nn.Module | None = None
        if s.shadow_checkpoint:
            self._shadows[(s.shadow, s.shadow_identity_weight)] = load_model(s.shadow_checkpoint, self.device)
        for family in (s.families if s.transfer else (s.shadow,)):
            self.shadow(family)
        self.attacker_images, _ = synthetic_faces(s.attacker_identities, s.attacker_per_identity, s.size,
                                                  seed=s.seed, first_identity=ATTACKER_FIRST)
        self.attackers = {f: self._decoder(f, "attacker", self.attacker_images) for f in s.families}
        if s.strong_attacker:
            self.attackers[STRONG] = self._strong()
        self.data = _verification_set(s)
        self.z = embed(self.encoder, self.data.images, flip=s.flip)
        self.left, self.right = torch.as_tensor(self.data.left), torch.as_tensor(self.data.right)
        positive = self.data.issame
        self.positive = np.flatnonzero(positive)  # the pairs whose gallery side is attacked
        self.stored, self.other = self.left[positive], self.right[positive]
        # each stored feature is reconstructed once, however many positive pairs attack it
        self.attacked, self.attack_rows = torch.unique(self.stored, return_inverse=True)
        # the server's basis is its gallery's, as an operator's would be (principal.principal_directions)
        self.keep_out = self._basis(self.z)
        self.clean_scores = cosine_scores(self.z[self.left], self.z[self.right])
        accuracy, std, threshold = ten_fold_accuracy(self.clean_scores, self.data.issame, FOLDS)
        self.threshold = threshold
        self.counts = resample_counts(fold_labels(len(self.data.issame)), s.replicates, seed=[s.seed, 1])
        # the gallery-wide figures' resamples draw identities (their images' pairs go with them)
        labels = self.data.labels
        self.gallery_counts = None if labels is None else \
            resample_counts(np.zeros(len(np.unique(labels))), s.replicates, seed=[s.seed, 2])
        gallery, self.clean_gallery_replicates = self._gallery_accuracy(self.z)
        self.clean = {"accuracy": accuracy, "std": std, "threshold": threshold, "gallery": gallery}
        self._clean_replicates: np.ndarray | None = None

    def _timed(self, key: str, fn):
        start = time.perf_counter()
        out = fn()
        self.timings[key] = round(self.timings.get(key, 0.0) + time.perf_counter() - start, 2)
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

    def _decoder(self, family: str, role: str, images: Tensor, identity_weight: float | None = None,
                 seed: int | None = None, name: str | None = None, encoder: nn.Module | None = None,
                 decoder: nn.Module | None = None, epochs: int | None = None) -> nn.Module:
        """Train a decoder of ``family`` on ``images`` (Eq. 1; shadows add the identity term with the settings'
        weight unless ``identity_weight`` says otherwise); ``name`` labels its timing and loss."""
        s = self.s
        seed = s.seed + (1 if role == "shadow" else 2) if seed is None else seed
        weight = (s.shadow_identity_weight if identity_weight is None else identity_weight) if role == "shadow" \
            else 0.0  # attackers: Eq. 1, as the threat model
        name = name or f"{role} {family}" + (f" w={weight:g}" if role == "shadow" and identity_weight is not None
                                             and weight != s.shadow_identity_weight else "")
        torch.manual_seed(seed)
        if decoder is None:
            decoder = build_model(family, feature_dim=s.feature_dim, size=s.size, width=s.decoder_width)
        decoder = decoder.to(self.device)
        history = self._timed(f"train {name}", lambda: train_decoder(
            decoder, encoder or self.encoder, images, epochs=epochs or s.decoder_epochs, seed=seed, normalize=True,
            progress=self.progress, identity_weight=weight, **self._batch()))
        self.training[f"{name} loss"] = history[-1]
        return decoder.eval()

    def _strong(self) -> nn.Module:
        """The stronger attacker: ResidualUpDecoder, twice as wide and trained 1.5 times as long by default."""
        s = self.s
        torch.manual_seed(s.seed + 3)
        decoder = ResidualUpDecoder(s.feature_dim, s.size, width=s.strong_width or 2 * s.decoder_width)
        return self._decoder("residual_up", "attacker", self.attacker_images, seed=s.seed + 3,
                             name=f"attacker {STRONG}", decoder=decoder,
                             epochs=s.strong_epochs or (3 * s.decoder_epochs + 1) // 2)

    def shadow(self, family: str | None = None, identity_weight: float | None = None, copy: int = 0) -> nn.Module:
        """The server's shadow of ``family`` trained with ``identity_weight`` (default: the settings'), trained
        on first use and kept. ``copy`` k > 0 is another shadow of that family, the same but for its seed (its
        initial weights and data order): an ensemble that repeats a family."""
        key = (family or self.s.shadow,
               self.s.shadow_identity_weight if identity_weight is None else float(identity_weight))
        if copy:
            key += (copy,)
        if key not in self._shadows:
            self._shadows[key] = self._decoder(
                key[0], "shadow", self.server_images, identity_weight=key[1],
                seed=self.s.seed + 1 + SHADOW_COPY_SEED * copy if copy else None,
                name=f"shadow {key[0]} #{copy + 1}" if copy else None)
        return self._shadows[key]

    def mismatch_shadow(self) -> nn.Module:
        """A shadow of the server's family trained on faces unlike the gallery's: few (mismatch_identities x
        mismatch_per_identity), of other identities and another render seed, in grey."""
        if self._mismatch is None:
            s = self.s
            images, _ = synthetic_faces(s.mismatch_identities, s.mismatch_per_identity, s.size,
                                        seed=s.seed + MISMATCH_SEED, first_identity=MISMATCH_FIRST)
            grey = images.mean(1, keepdim=True).expand_as(images).contiguous()
            self._mismatch = self._decoder(s.shadow, "shadow", grey, seed=s.seed + 6, name="mismatch shadow")
        return self._mismatch

    def _basis(self, features: Tensor) -> Tensor | None:
        """The keep_out basis of these features (``principal_directions``; "auto": by AUTO_SHARE), None when off."""
        keep_out = self.s.keep_out
        return principal_directions(features, None if keep_out == "auto" else keep_out) if keep_out else None

    def train_adaptive(self, config: ProtectConfig) -> None:
        """The adaptive attacker for ``config``: it knows the algorithm and the config, trains its own shadow
        (the server's family and identity weight) on its own faces, protects its own features with it, and
        trains an ``adaptive_family`` reconstruction network on (protected feature, image) pairs; with keep_out,
        its basis is its own faces' principal directions."""
        s = self.s
        own = self._decoder(s.shadow, "shadow", self.attacker_images, seed=s.seed + 4, name="adaptive shadow")
        basis = self._basis(embed(self.encoder, self.attacker_images, flip=s.flip))
        protector = Protector(own, self.encoder, config, backend=s.backend, keep_out=basis)
        self.attackers[ADAPTIVE] = self._decoder(s.adaptive_family, "attacker", self.attacker_images,
                                                 seed=s.seed + 5, name=f"attacker {ADAPTIVE}",
                                                 encoder=ProtectedEncoder(self.encoder, protector))

    def protect(self, config: ProtectConfig, shadow: str | nn.Module | list | None = None,
                batch_size: int = 1024) -> Tensor:
        """AdvFace features of every image (the stored gallery), in batches; ``shadow`` a family, a module or a
        list of them (an ensemble; a family named again is its next copy, ``shadow(copy=...)``)."""
        if isinstance(shadow, (list, tuple)):
            module = [one if isinstance(one, nn.Module) else self.shadow(one, copy=shadow[:k].count(one))
                      for k, one in enumerate(shadow)]
        else:
            module = shadow if isinstance(shadow, nn.Module) else self.shadow(shadow)
        protector = Protector(module, self.encoder, config, backend=self.s.backend, keep_out=self.keep_out)
        z = self.z.to(self.device)
        return torch.cat([protector(z[i:i + batch_size]).cpu() for i in range(0, len(z), batch_size)])

    def baseline(self, method: str, config: ProtectConfig) -> Tensor:
        """Stored features of ``method`` ("unprotected", "random", "dp", "advface") at ``config``'s budget and guard."""
        if method == "unprotected":
            return self.z
        if method == "advface":
            return self.protect(config)
        if method == "random":
            z = self.z.to(self.device)
            return random_baseline(z, self.shadow(), self.encoder, config, seed=self.s.seed).cpu()
        if method == "dp":
            return dp_baseline(self.z, config.eps, normalize=config.normalize, seed=self.s.seed, norm=config.norm,
                               min_cosine=config.min_cosine)
        raise ValueError(f"unknown method {method!r}")

    def measure(self, stored: Tensor, attackers, quality_rows: int = 0, grid_rows: int = 0) -> Measurement:
        """Scores of every pair and each attacker's hits for these stored features; the first ``quality_rows``
        reconstructions get L1 / PSNR / SSIM, the first ``grid_rows`` are kept for the grids."""
        m = Measurement(cosine_scores(stored[self.left], self.z[self.right]),
                        cosine_scores(stored[self.left], stored[self.right]), *self._gallery_accuracy(stored))
        for name in attackers:
            m.hits[name], m.hits_self[name], images = attack_hits(
                self.attackers[name], self.encoder, stored[self.attacked], self.z[self.other], self.z[self.stored],
                self.threshold, self.s.flip, rows=self.attack_rows)
            if quality_rows:
                m.quality[name] = reconstruction_quality(images[:quality_rows],
                                                         self.data.images[self.attacked[:quality_rows]])
            if grid_rows:
                m.images[name] = images[:grid_rows]
        return m

    def _gallery_accuracy(self, stored: Tensor) -> tuple[float | None, np.ndarray | None]:
        """``gallery_accuracy`` of these stored features against the clean ones, and its value on each identity
        resample (``gallery_counts``); (None, None) where the identities are not known."""
        if self.gallery_counts is None:
            return None, None
        histograms = gallery_histograms(stored, self.z, self.data.labels)
        accuracy = float(best_balanced_accuracy(histograms[0].sum(0), histograms[1].sum(0)))
        return accuracy, resampled_gallery_accuracy(histograms, self.gallery_counts)

    def clean_replicates(self) -> np.ndarray:
        """The clean 10-fold accuracy of each bootstrap resample (computed once, shared by every interval)."""
        if self._clean_replicates is None:
            self._clean_replicates = resampled_accuracy(self.clean_scores, self.data.issame, self.counts, FOLDS)
        return self._clean_replicates


def _cross_family(s: EvalSettings) -> list[str]:
    return [f for f in s.families if f != s.shadow] or list(s.families)


def _attackers(s: EvalSettings) -> list[str]:
    return list(s.families) + [STRONG] * s.strong_attacker + [ADAPTIVE] * s.adaptive_attacker


# ---------------------------------------------------------------- figures over seeds, with intervals


def loss_interval(runs: list[Run], measured: list[Measurement], mode: str = "offline") -> dict:
    """Accuracy lost to the stored features (clean minus protected, a fraction), ``mode`` "offline" or
    "online", mean over runs, with its paired bootstrap interval."""

    def statistic(k: int, w: np.ndarray) -> np.ndarray:
        run = runs[k]
        clean = run.clean_replicates() if w is run.counts else \
            resampled_accuracy(run.clean_scores, run.data.issame, w, FOLDS)
        return clean - resampled_accuracy(getattr(measured[k], mode), run.data.issame, w, FOLDS)

    return bootstrap_interval(statistic, [run.counts for run in runs])


def gallery_loss_interval(runs: list[Run], measured: list[Measurement]) -> dict:
    """Gallery-wide accuracy lost to the stored features (clean minus protected, a fraction), mean over runs, with
    its paired bootstrap interval over identities: each resample draws a run's gallery identities with
    replacement, and clean and stored features are scored on the same draw (taken in ``Run.measure``)."""

    def statistic(k: int, w: np.ndarray) -> np.ndarray:
        run, m = runs[k], measured[k]
        if w is run.gallery_counts:
            return run.clean_gallery_replicates - m.gallery_replicates
        if not (w == 1).all():
            raise ValueError("the gallery-wide replicates are taken on the run's own identity resamples only")
        return np.full(len(w), run.clean["gallery"] - m.gallery)  # all-one counts: the gallery as measured

    return bootstrap_interval(statistic, [run.gallery_counts for run in runs])


def success_interval(runs: list[Run], hits: list[np.ndarray]) -> dict:
    """Attack success (the mean of per-feature hits, a fraction), mean over runs, with its bootstrap interval:
    the attacked features are the positive pairs', resampled with them."""

    def statistic(k: int, w: np.ndarray) -> np.ndarray:
        wp = w[:, runs[k].positive]
        return (wp * hits[k]).sum(1) / wp.sum(1)

    return bootstrap_interval(statistic, [run.counts for run in runs])


def verification_figures(runs: list[Run], measured: list[Measurement], intervals=("offline", "online")) -> dict:
    """Per mode: the 10-fold accuracy (mean over seeds), its fold std (mean over seeds), each seed's figure,
    and for the modes in ``intervals`` the loss against clean features with its interval."""
    out = {}
    for mode in ("offline", "online"):
        per_seed = [ten_fold_accuracy(getattr(m, mode), run.data.issame, FOLDS) for run, m in zip(runs, measured)]
        out[mode] = {"accuracy": float(np.mean([a for a, _, _ in per_seed])),
                     "std": float(np.mean([sd for _, sd, _ in per_seed])),
                     "per_seed": [a for a, _, _ in per_seed],
                     "loss_per_seed": [run.clean["accuracy"] - a for run, (a, _, _) in zip(runs, per_seed)]}
        if mode in intervals:
            out[mode]["loss"] = loss_interval(runs, measured, mode)
    if all(m.gallery is not None for m in measured):
        losses = [run.clean["gallery"] - m.gallery for run, m in zip(runs, measured)]
        out["gallery"] = {"loss": gallery_loss_interval(runs, measured), "loss_per_seed": losses,
                          "accuracy": float(np.mean([m.gallery for m in measured]))}
    return out


def attack_figures(runs: list[Run], measured: list[Measurement], attackers: list[str], cross: list[str],
                   intervals: bool = True) -> dict:
    """Per attacker and for the cross-family mean: success against another image and against the stored one
    (means over seeds), each seed's success, an interval, and the reconstruction quality where measured."""
    out = {}
    groups = {name: [name] for name in attackers}
    groups["cross_family_mean"] = cross
    for name, members in groups.items():
        hits = [np.mean([m.hits[a] for a in members], axis=0) for m in measured]
        hits_self = [np.mean([m.hits_self[a] for a in members], axis=0) for m in measured]
        entry = {"success": float(np.mean([h.mean() for h in hits])),
                 "success_self": float(np.mean([h.mean() for h in hits_self])),
                 "per_seed": [float(h.mean()) for h in hits]}
        if intervals:
            entry["interval"] = success_interval(runs, hits)
        if name in measured[0].quality:
            for key in ("l1", "psnr", "ssim"):
                entry[key] = float(np.mean([m.quality[name][key] for m in measured]))
        out[name] = entry
    return out


def point(runs: list[Run], stored: list[Tensor], cross: list[str], measured: list[Measurement] | None = None) -> dict:
    """Offline and online accuracy, the cross-family attack success and the intervals of the offline loss and
    of that success (means over seeds) of one set of stored features per run; ``measured``: their
    Measurements when already taken (with the cross-family attackers among theirs), not taken again."""
    measured = measured or [run.measure(z, cross) for run, z in zip(runs, stored)]
    verification = verification_figures(runs, measured, intervals=("offline",))
    attack = attack_figures(runs, measured, cross, cross)["cross_family_mean"]
    return {"offline": verification["offline"]["accuracy"], "online": verification["online"]["accuracy"],
            "attack_success": attack["success"], "offline_loss": verification["offline"]["loss"],
            "gallery_loss": verification.get("gallery", {}).get("loss"),
            "attack_interval": attack["interval"],
            "per_seed": {"offline_loss": verification["offline"]["loss_per_seed"],
                         "attack_success": attack["per_seed"]}}


# ---------------------------------------------------------------- the evaluation


def run_evaluation(s: EvalSettings, progress: bool = True) -> dict:
    """All figures of the evaluation (see the module docstring); percentages are fractions in [0, 1]."""
    start = time.perf_counter()
    config = s.config()
    runs = [Run(dataclasses.replace(s, seed=seed), progress) for seed in s.seeds()]
    if s.adaptive_attacker:
        for run in runs:
            run.train_adaptive(config)
    cross = _cross_family(s)
    attackers = _attackers(s)
    first = runs[0]
    results: dict = {
        "label": "synthetic" if not (s.bin or s.folder) else first.data.name,
        "settings": s.to_dict(),
        "config": config.to_dict(),
        "device": str(first.device),
        "threads": torch.get_num_threads(),  # training's sums depend on it: the run repeats at this count
        "seeds": s.seeds(),
        "data": {"gallery images": len(first.data.images), "pairs": len(first.data.issame),
                 "pairs total": sum(len(r.data.issame) for r in runs),
                 "stored features attacked": len(first.attacked), "attacks": len(first.stored),
                 "bootstrap replicates": s.replicates},
        "threshold": float(np.mean([r.threshold for r in runs])),
        "threshold_rule": "the mean of the ten per-fold thresholds of the clean 10-fold verification (per seed)",
        "dp": {"norm": config.norm, "laplace_scale": dp_scale(config.eps, s.feature_dim, config.norm),
               "sensitivity_l1": 2 * s.feature_dim ** 0.5,
               "epsilon": dp_epsilon(config.eps, s.feature_dim, config.norm)},
        "verification": {"clean": {"accuracy": float(np.mean([r.clean["accuracy"] for r in runs])),
                                   "std": float(np.mean([r.clean["std"] for r in runs])),
                                   "per_seed": [r.clean["accuracy"] for r in runs],
                                   **({"gallery": float(np.mean([r.clean["gallery"] for r in runs]))}
                                      if all(r.clean["gallery"] is not None for r in runs) else {})}},
        "identity_inference": {},
        "attackers": attackers,
        "cross_family_attackers": cross,
    }
    if first.keep_out is not None:  # per seed: the directions kept out and their share of the gallery's variance
        results["keep_out"] = {"directions": [len(r.keep_out) for r in runs],
                               "variance_share": [variance_share(r.keep_out, r.z) for r in runs]}
    grids = {}
    stored_advface = None
    taken = {}  # (method, config, shadow identity weight) -> Measurements: the sweep's own point is not redone
    for method in progress_bar(METHODS, progress=progress, desc="methods", leave=False):
        stored = [run._timed(f"protect {method}", lambda r=run, m=method: r.baseline(m, config)) for run in runs]
        stored_advface = stored if method == "advface" else stored_advface
        measured = [run.measure(z, attackers, quality_rows=s.quality_rows, grid_rows=s.grid_rows if k == 0 else 0)
                    for k, (run, z) in enumerate(zip(runs, stored))]
        taken[(method, config, s.shadow_identity_weight)] = measured
        results["verification"][method] = verification_figures(runs, measured)
        results["identity_inference"][method] = attack_figures(runs, measured, attackers, cross)
        for name, images in measured[0].images.items():
            grids.setdefault(name, {})[method] = images
    n = len(first.z)
    results["throughput"] = {"advface features per second": n / max(first.timings["protect advface"], 1e-9),
                             "backend": Protector(first.shadow(), first.encoder, config, s.backend,
                                                  keep_out=first.keep_out).backend_name}
    if s.transfer:
        results["transfer"] = transfer_matrix(runs, config, attackers, taken, progress)
    results["anchor_only"] = {**point(runs, [run.protect(config.replace(steps=0)) for run in runs], cross),
                              "cosine": float(np.mean([_anchor_cosine(run, run.shadow(), config) for run in runs])),
                              "fit": [_fit(run, run.shadow(), config) for run in runs]}
    if s.mismatch:
        results["mismatch"] = mismatch(runs, config, cross)
    results["sweep"] = sweep(runs, config, cross, progress, taken)
    results["pareto"] = pareto_front(results["sweep"])
    results["recommended"] = recommend(results["sweep"], s.max_verification_loss, config.anchor,
                                       s.shadow_identity_weight, config.objective)
    loss = results["verification"]["advface"]["offline"]["loss"]
    results["recommended"]["config_meets_rule"] = 100 * loss["high"] <= s.max_verification_loss
    results["resolution"] = resolution(results, s)
    timings: dict[str, float] = {}
    for run in runs:
        for key, value in run.timings.items():
            timings[key] = round(timings.get(key, 0.0) + value, 2)
    results["timings"] = {**timings, "total": round(time.perf_counter() - start, 2)}
    results["training"] = [run.training for run in runs]
    results["artifacts"] = {"originals": first.data.images[first.attacked[: s.grid_rows]], "grids": grids}
    return results


def shadow_sets(s: EvalSettings) -> list[tuple[str, ...]]:
    """The transfer matrix's shadow sets: each family alone, then the ensembles (``s.ensembles``; by default the
    server's family with one other family, with two, ..., in the order of ``s.families``)."""
    if s.ensembles is not None:
        ensembles = [tuple(e) for e in s.ensembles]
    else:
        others = [f for f in s.families if f != s.shadow]
        ensembles = [(s.shadow, *others[:k]) for k in range(1, len(others) + 1)]
    return [(f,) for f in s.families] + ensembles


def transfer_matrix(runs: list[Run], config: ProtectConfig, attackers: list[str], taken: dict,
                    progress: bool = True) -> list[dict]:
    """Per shadow set (``shadow_sets``) and objective (``s.transfer_objectives``): every attacker's success,
    the mean over the attackers that saw none of its families ("unseen": the other families and the stronger
    attacker; not the adaptive one, trained against the evaluated config) with its interval, the worst unseen
    attacker, and the offline loss with its interval. The evaluated config's own row reuses ``taken``."""
    s = runs[0].s
    rows = []
    grid = list(itertools.product(shadow_sets(s), s.transfer_objectives))
    for shadows, objective in progress_bar(grid, progress=progress, desc="transfer", leave=False):
        cfg = config.replace(objective=objective)
        measured = taken.get(("advface", cfg, s.shadow_identity_weight)) if shadows == (s.shadow,) else None
        if measured is None or any(a not in measured[0].hits for a in attackers):
            stored = [run.protect(cfg, list(shadows)) for run in runs]
            measured = [run.measure(z, attackers) for run, z in zip(runs, stored)]
        unseen = [a for a in attackers if a not in shadows and a != ADAPTIVE]
        figures = attack_figures(runs, measured, attackers, unseen or attackers)
        verification = verification_figures(runs, measured, intervals=("offline",))
        rows.append({"shadows": list(shadows), "objective": objective, "unseen": unseen,
                     "success": {a: figures[a]["success"] for a in attackers},
                     "unseen_mean": figures["cross_family_mean"]["success"] if unseen else None,
                     "unseen_interval": figures["cross_family_mean"]["interval"] if unseen else None,
                     "unseen_max": max((figures[a]["success"] for a in unseen), default=None),
                     "offline": verification["offline"]["accuracy"],
                     "offline_loss": verification["offline"]["loss"],
                     "online": verification["online"]["accuracy"]})
    return rows


def _anchor_cosine(run: Run, shadow: nn.Module, config: ProtectConfig) -> float:
    """Mean cos(E(S(z)), z) over the gallery: how near the shadow's own anchor (before the guard) is to z."""
    with torch.no_grad():
        z = run.z.to(run.device)
        _, anchor = shadow_targets(z, shadow.eval(), run.encoder.eval(), config.replace(anchor="shadow"))
        return float(F.cosine_similarity(anchor, z, dim=1).mean())


def _fit(run: Run, shadow: nn.Module, config: ProtectConfig) -> float:
    """The preflight's figure (Protector.check_fit): median cos(E(S(z)), z) on a sample of the gallery."""
    return Protector(shadow, run.encoder, config, backend="reference").check_fit(run.z.to(run.device)).median


def mismatch(runs: list[Run], config: ProtectConfig, cross: list[str]) -> dict:
    """The config with a shadow that does not fit the gallery (``Run.mismatch_shadow``), with its guard and
    without any: what the guard keeps of recognition when the shadow is weak."""
    s = runs[0].s
    shadows = [run.mismatch_shadow() for run in runs]
    out = {"shadow_images": s.mismatch_identities * s.mismatch_per_identity,
           "fit": [_fit(run, sh, config) for run, sh in zip(runs, shadows)],
           "anchor_cosine": float(np.mean([_anchor_cosine(run, sh, config) for run, sh in zip(runs, shadows)])),
           "min_cosine": config.min_cosine}
    variants = {"guard": config, "no_guard": config.replace(min_cosine=None)}
    if config.min_cosine is None:
        del variants["guard"]
    for key, cfg in variants.items():
        out[key] = point(runs, [run.protect(cfg, sh) for run, sh in zip(runs, shadows)], cross)
    return out


def sweep_grid(s: EvalSettings, config: ProtectConfig) -> list[tuple[str, ProtectConfig, float]]:
    """(method, config, shadow identity weight) of every sweep point: AdvFace over the product of the sweep
    axes and over that of each of ``sweep_grids`` (an axis it leaves out: the config's value), every axis with
    the config's own value added (so the evaluated config lies on every curve; alpha keeps the config's
    alpha/eps; anchor "original" starts at random, anchor "shadow" as the config does when it is the
    config's anchor, else at the anchor), each point once; then Random and DP over the main grid's
    eps at the config's other fields."""
    ratio = config.alpha / config.eps
    own = {"sweep_eps": config.eps, "sweep_steps": config.steps, "sweep_min_cosine": config.min_cosine,
           "sweep_anchor": config.anchor, "sweep_objective": config.objective,
           "sweep_identity_weight": s.shadow_identity_weight}

    def axis(grid: dict, name: str) -> tuple:  # numbers ascending, no guard (None) last, names as given
        values = tuple(dict.fromkeys((*grid.get(name, ()), own[name])))
        if name in ("sweep_anchor", "sweep_objective"):
            return values
        return tuple(sorted(values, key=lambda v: (v is None, 0 if v is None else v)))

    main = {name: getattr(s, name) for name in SWEEP_AXES}
    points = {}
    for grid in (main, *s.sweep_grids):
        axes = [axis(grid, name) for name in reversed(SWEEP_AXES)]  # one shadow at a time
        for weight, objective, anchor, c, steps, eps in itertools.product(*axes):
            start = anchor == "original" or (anchor == config.anchor and config.random_start)
            alpha = config.alpha if eps == config.eps else eps * ratio  # the config's own, not rounded again
            cfg = config.replace(eps=eps, alpha=alpha, steps=steps, min_cosine=c, anchor=anchor,
                                 random_start=start, objective=objective)
            points.setdefault((cfg, weight), ("advface", cfg, weight))
    baselines = [(method, config.replace(eps=eps, alpha=config.alpha if eps == config.eps else eps * ratio),
                  s.shadow_identity_weight)
                 for method in ("random", "dp") for eps in axis(main, "sweep_eps")]
    return sorted(points.values(), key=lambda p: p[2]) + baselines  # stable: grid order within a shadow


def sweep(runs: list[Run], config: ProtectConfig, cross: list[str], progress: bool = True,
          taken: dict | None = None) -> list[dict]:
    """Privacy/utility points (``sweep_grid``), each with its offline-loss and attack-success intervals;
    ``taken``: {(method, config, shadow identity weight): Measurements} of points already measured (the
    evaluated config's), used instead of protecting and attacking again."""
    points = []
    for method, cfg, weight in progress_bar(sweep_grid(runs[0].s, config), progress=progress, desc="sweep",
                                            leave=False):
        measured = (taken or {}).get((method, cfg, weight))
        if measured is not None:
            stored = None
        elif method == "advface":
            stored = [run.protect(cfg, run.shadow(identity_weight=weight)) for run in runs]
        else:
            stored = [run.baseline(method, cfg) for run in runs]
        advface = method == "advface"
        points.append({"method": method, "eps": cfg.eps, "alpha": cfg.alpha if advface else None,
                       "steps": cfg.steps if advface else None, "min_cosine": cfg.min_cosine,
                       "anchor": cfg.anchor if advface else None, "random_start": cfg.random_start if advface else None,
                       "objective": cfg.objective if advface else None,
                       "shadow_identity_weight": weight if advface else None,
                       **point(runs, stored, cross, measured)})
    return points


def pareto_front(points: list[dict]) -> list[dict]:
    """The AdvFace points no other AdvFace point beats on both offline loss and attack success (estimates),
    by increasing loss."""
    advface = [p for p in points if p["method"] == "advface"]

    def key(p):
        return p["offline_loss"]["estimate"], p["attack_success"]

    front = [p for p in advface if not any(key(q)[0] <= key(p)[0] and key(q)[1] <= key(p)[1] and key(q) != key(p)
                                           for q in advface)]
    return sorted(front, key=key)


def recommend(points: list[dict], max_loss_points: float = 0.5, anchor: str | None = None,
              shadow_identity_weight: float | None = None, objective: str | None = None) -> dict:
    """The AdvFace sweep point (steps >= 1) with the lowest cross-family attack success whose offline loss's
    interval ends at or below ``max_loss_points`` percentage points (ties: lower loss, smaller eps, fewer
    steps): "point" over the whole sweep, and "same_anchor" among the points with ``anchor``,
    ``shadow_identity_weight`` and ``objective`` (the evaluated ones: what eps, alpha, steps and min_cosine
    alone can reach).
    None where no point meets the rule."""

    def best(candidates: list[dict]) -> dict | None:
        ok = [p for p in candidates if p["method"] == "advface" and p["steps"]
              and 100 * p["offline_loss"]["high"] <= max_loss_points]
        return min(ok, key=lambda p: (p["attack_success"], p["offline_loss"]["estimate"], p["eps"], p["steps"])) \
            if ok else None

    same = [p for p in points if p["method"] == "advface" and anchor in (None, p["anchor"])
            and shadow_identity_weight in (None, p["shadow_identity_weight"])
            and objective in (None, p["objective"])]
    return {"max_loss_points": max_loss_points, "point": best(points), "same_anchor": best(same),
            "rule": f"lowest cross-family attack success whose offline loss's 95% interval ends at or below "
                    f"{max_loss_points:g} point"}


def resolution(results: dict, s: EvalSettings) -> dict:
    """How finely this run tells accuracy losses apart: the half-width of AdvFace's offline-loss interval (in
    points), and whether that supports the recommendation's rule (it does not at the tiny scale, nor when the
    half-width exceeds the rule's bound)."""
    half = 100 * results["verification"]["advface"]["offline"]["loss"]["half_width"]
    if s.scale == "tiny":
        reason = "the tiny scale is a smoke test: its models and gallery are too small for its figures to mean " \
                 "anything"
    elif half > s.max_verification_loss:
        reason = (f"the offline loss is known to +-{half:.2f} point only, wider than the rule's "
                  f"{s.max_verification_loss:g} point: use more pairs or seeds (--scale medium)")
    else:
        reason = ""
    return {"offline_loss_half_width_points": half, "pairs": results["data"]["pairs total"],
            "seeds": len(results["seeds"]), "supports_recommendation": not reason, "warning": reason}
