"""Reference backend: ALGORITHM.md written out in PyTorch. It is the specification.

    x~ = S(z),  z~ = E(x~)                                   (3)
    g_t = d/dz || S(z_t) - x~ ||_1                           (4)  (objective "pixel"; see objective)
    z_{t+1} = Proj_eps(z_t + alpha * sign(g_t)),  z_0 = z~   (2, 5)

and the utility guard after each of them: Cap(u) moves u onto {u : cos(u, z) >= min_cosine}. With an
ensemble of shadows S_1..S_K, x~_k = S_k(z) and g_t = d/dz sum_k || S_k(z_t) - x~_k ||_1. With smoothing m,
g_t is the mean of g at m noisy copies z_t + s ||z_t|| / sqrt(D) n_tj (smoothed_gradient). With a basis B
to keep out (k orthonormal rows), each iterate's change from z loses its part along B before the guard:
u -> z + (I - B^T B)(u - z) (kept_out).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ProtectConfig
from ..ensemble import ShadowEnsemble, members
from ..noise import ball_noise, copy_noise, row_keys
from ..principal import check_basis
from .modules import as_input_of, channels_last, fold_batchnorm, global_forward_hooks, inplace_activations, weights_key


def shadow_targets(z: Tensor, shadow: nn.Module, encoder: nn.Module,
                   config: ProtectConfig) -> tuple[list[Tensor], Tensor]:
    """Shadow images x~_k = S_k(z), one per shadow (one for a single shadow), and the anchor z_0 (Eq. 3):
    z~ = E(x~_1), or with ensemble_anchor "mean" the mean_direction of every E(x~_k); or z itself."""
    with torch.no_grad():
        x_shadow = [s(z) for s in members(shadow)]
        if config.anchor == "original":
            anchor = z.clone()
        else:
            used = x_shadow if config.ensemble_anchor == "mean" else x_shadow[:1]
            anchors = [encoder(as_input_of(encoder, x)).to(z.dtype) for x in used]
            anchor = anchors[0] if len(anchors) == 1 else mean_direction(anchors)
        if config.normalize:
            anchor = F.normalize(anchor, dim=1)
    return x_shadow, anchor


def mean_direction(features: list[Tensor]) -> Tensor:
    """Per row, the mean of the normalised features, scaled to their mean norm."""
    direction = F.normalize(torch.stack([F.normalize(f, dim=1) for f in features]).mean(0), dim=1)
    return direction * torch.stack([f.norm(dim=1, keepdim=True) for f in features]).mean(0)


def random_start(anchor: Tensor, z: Tensor, config: ProtectConfig) -> Tensor:
    """A uniform start inside the ball, drawn per row from (seed, row bytes) (noise.ball_noise).

    Seeding by content keeps a row's result independent of batch size and chunking.
    """
    return anchor + ball_noise(z, config.seed, config.eps, config.norm).to(anchor)


def guard_frame(z: Tensor) -> tuple[Tensor, Tensor]:
    """(z_hat, fallback) per row, what the guard needs of the caller's feature z: its direction, and a
    unit vector orthogonal to it (e_k made orthogonal to z, k the index of z's smallest |coordinate|,
    the first on ties) along which a row pointing exactly away from z turns. z has no zero row."""
    z_hat = F.normalize(z, dim=1)
    k = z_hat.abs().argmin(dim=1, keepdim=True)
    fallback = -z_hat.gather(1, k) * z_hat
    fallback.scatter_add_(1, k, torch.ones_like(k, dtype=z_hat.dtype))
    return z_hat, F.normalize(fallback, dim=1)


def guard(u: Tensor, frame: tuple[Tensor, Tensor], min_cosine: float | None) -> Tensor:
    """The utility guard: each row of u with cos(u, z) < min_cosine rotated toward z, in the plane of u
    and z, to cos = min_cosine, its norm kept (the cap's nearest point of that norm); other rows as they
    are. A row within 1e-6 radian of -z turns along ``frame``'s fallback; a zero row is taken as norm 1."""
    if min_cosine is None:
        return u
    z_hat, fallback = frame
    along = (u * z_hat).sum(1, keepdim=True)
    norm = u.norm(dim=1, keepdim=True)
    outside = (along < min_cosine * norm) | (norm == 0)
    radius = torch.where(norm > 0, norm, torch.ones_like(norm))
    across = u - along * z_hat
    across = across - (across * z_hat).sum(1, keepdim=True) * z_hat  # twice: exact even when u is near -z
    across_norm = across.norm(dim=1, keepdim=True)
    turn = torch.where(across_norm > 1e-6 * radius, across / across_norm.clamp_min(1e-30), fallback)
    edge = radius * (min_cosine * z_hat + (1 - min_cosine ** 2) ** 0.5 * turn)
    return torch.where(outside, edge, u)


def kept_out(u: Tensor, z: Tensor, basis: Tensor | None) -> Tensor:
    """u with its change from z taken out of the span of ``basis``'s orthonormal rows: z + (I - B^T B)(u - z);
    u itself when there is no basis."""
    if basis is None:
        return u
    change = u - z
    return z + change - (change @ basis.T) @ basis


def basis_for(basis: Tensor | None, z: Tensor) -> Tensor | None:
    """A keep_out basis on z's device and in its dtype, checked against z's feature dim; None stays None."""
    if basis is None:
        return None
    if basis.shape[1] != z.shape[1]:
        raise ValueError(f"keep_out is a basis of {basis.shape[1]}-dim features and these features have "
                         f"{z.shape[1]} dims: make it from features of this encoder")
    return basis.to(device=z.device, dtype=z.dtype)


def gradient(shadow: nn.Module, encoder: nn.Module, z_t: Tensor, x_shadow: list[Tensor], z: Tensor,
             config: ProtectConfig) -> Tensor:
    """g_t: the gradient of the objective summed over the shadows (each against its own x~_k), taken one
    shadow at a time (the same sum; each shadow's graph is freed before the next one runs)."""
    return sum(torch.autograd.grad(objective(s, encoder, z_t, x, z, config), z_t)[0]
               for s, x in zip(members(shadow), x_shadow))


def smoothed_gradient(shadow: nn.Module, encoder: nn.Module, z_t: Tensor, x_shadow: list[Tensor], z: Tensor,
                      config: ProtectConfig, keys: tuple[Tensor, Tensor], step: int) -> Tensor:
    """The mean of ``gradient`` at config.smoothing noisy copies of z_t, z_t + s ||z_t|| / sqrt(D) n_j, n_j the
    row's normals for copy j of this step (noise.copy_noise of the caller's row keys: batch-independent).
    The noise is a constant offset, so each copy's gradient with respect to it is the one with respect to z_t."""
    scale = config.smoothing_scale * z_t.detach().norm(dim=1, keepdim=True) / z_t.shape[1] ** 0.5
    total = torch.zeros_like(z_t)
    for j in range(config.smoothing):
        noise = copy_noise(keys, z_t.shape[1], step * config.smoothing + j).to(z_t.dtype)
        copy = (z_t.detach() + scale * noise).requires_grad_(True)
        total += gradient(shadow, encoder, copy, x_shadow, z, config)
    return total / config.smoothing


def objective(shadow: nn.Module, encoder: nn.Module, z_t: Tensor, x_shadow: Tensor, z: Tensor,
              config: ProtectConfig) -> Tensor:
    """What each step ascends for one shadow, summed over the rows (each row's gradient is its own term's):
    "pixel" ||S(z_t) - x~||_1 (Eq. 4); "identity" 1 - cos(E(S(z_t)), z), the encoder's verdict on the
    shadow's reconstruction; "pixel+identity" the mean per-pixel L1 + identity_weight * that."""
    x_t = shadow(z_t)
    if config.objective == "pixel":
        return (x_t - x_shadow).abs().sum()
    feature = encoder(as_input_of(encoder, x_t))
    if not feature.requires_grad:  # an ONNX session, or an encoder that detaches its output
        raise ValueError(f"objective {config.objective!r} takes its gradient through the encoder, and this "
                         f"encoder ({type(encoder).__name__}) gives none: use a torch encoder, or objective 'pixel'")
    away = 1 - F.cosine_similarity(feature.to(z.dtype), z, dim=1)
    if config.objective == "identity":
        return away.sum()
    return ((x_t - x_shadow).abs().flatten(1).mean(1) + config.identity_weight * away).sum()


def step_direction(grad: Tensor, norm: str) -> Tensor:
    """sign(g) for L-inf; g / ||g||_2 per row for L2 (a zero gradient gives no step)."""
    if norm == "linf":
        return grad.sign()
    return grad / grad.norm(dim=1, keepdim=True).clamp_min(1e-12)


def project(z_next: Tensor, z_prev: Tensor, anchor: Tensor, config: ProtectConfig) -> Tensor:
    """The constraint: onto the eps-ball around the anchor, or clip the step itself."""
    center = anchor if config.constraint == "ball" else z_prev
    delta = z_next - center
    if config.norm == "linf":
        delta = delta.clamp(-config.eps, config.eps)
    else:
        scale = (config.eps / delta.norm(dim=1, keepdim=True).clamp_min(1e-12)).clamp(max=1.0)
        delta = delta * scale
    return center + delta


REFERENCE_DTYPES = {"fp32": None, "bf16": torch.bfloat16}  # the decoder's precision ("fp32": the shadow's own)


class LowPrecision(nn.Module):
    """A decoder whose weights are in ``dtype``: z cast in, the image cast back to z's dtype, so the steps
    stay in z's."""

    def __init__(self, shadow: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.shadow, self.dtype = shadow, dtype

    def forward(self, z: Tensor) -> Tensor:
        return self.shadow(z.to(self.dtype)).to(z.dtype)


def faster_shadow(shadow: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """``fold_batchnorm(shadow)``, in ``dtype`` if given (``LowPrecision``), laid out ``channels_last`` in float32
    or bfloat16 on a CPU, its activations in place where that is safe (``inplace_activations``)."""
    folded = fold_batchnorm(shadow)
    if dtype is not None:
        folded = folded.to(dtype)
    like = next(folded.parameters(), torch.empty(0, dtype=torch.float64))
    if like.device.type == "cpu" and like.dtype in (torch.float32, torch.bfloat16):  # oneDNN's dtypes
        folded = channels_last(folded)
    folded = inplace_activations(folded)
    return folded if dtype is None else LowPrecision(folded, dtype)


class FasterShadow:
    """``FasterShadow(shadow, dtype)()``: the shadow as the reference runs it, ``faster_shadow`` of each member
    of an ensemble, rebuilt whenever the shadow's weights change or a global forward hook comes or goes; in
    training mode the shadow itself."""

    def __init__(self, shadow: nn.Module, dtype: torch.dtype | None = None):
        self.shadow, self.dtype = shadow, dtype
        self._built: tuple[tuple, nn.Module] | None = None

    def __call__(self) -> nn.Module:
        if any(m.training for shadow in members(self.shadow) for m in shadow.modules()):
            return self.shadow
        key = weights_key(self.shadow), global_forward_hooks()  # a global hook added later turns in-place off
        if self._built is None or self._built[0] != key:
            built = [faster_shadow(s, self.dtype) for s in members(self.shadow)]
            self._built = key, built[0] if len(built) == 1 else ShadowEnsemble(built)
        return self._built[1]


class ReferenceBackend:
    """Plain PyTorch autograd with respect to the feature only.

    The decoder it runs is ``fold_batchnorm(shadow)``, in float32 or bfloat16 on a CPU through
    ``channels_last`` (the layout oneDNN's convolutions run fastest in), with its ReLUs in place where
    nothing else reads their input, rebuilt whenever the shadow's weights change; in training mode it
    runs the shadow itself.

    dtype: "fp32" (default) runs the decoder in the shadow's own dtype; "bf16" in bfloat16 (opt-in, for
    CPUs with bfloat16 matrix units: AMX, AVX512-BF16), z, the anchor and the steps staying in the
    shadow's dtype. bfloat16 flips some gradient signs: the results agree with fp32's within bf16's
    tolerance, not to the bit.

    keep_out: a (k, D) basis with orthonormal rows (``principal.principal_directions``) whose span every
    iterate's change from z is kept out of (``kept_out``), before the guard; None: no such constraint.
    """

    name = "reference"

    def __init__(self, shadow: nn.Module, encoder: nn.Module, config: ProtectConfig, dtype: str = "fp32",
                 keep_out: Tensor | None = None):
        if dtype not in REFERENCE_DTYPES:
            raise ValueError(f"reference backend dtype must be one of {sorted(REFERENCE_DTYPES)}, got {dtype!r}")
        self.shadow, self.encoder, self.config, self.dtype = shadow, encoder, config, dtype
        self.keep_out = None if keep_out is None else check_basis(keep_out)
        self.faster = FasterShadow(shadow, REFERENCE_DTYPES[dtype])

    def step_shadow(self) -> nn.Module:
        """S as run at every step (each shadow of an ensemble): the same function as ``self.shadow``, less
        work."""
        return self.faster()

    def run(self, z: Tensor) -> Tensor:
        cfg = self.config
        shadow = self.step_shadow()
        basis = basis_for(self.keep_out, z)
        x_shadow, anchor = shadow_targets(z, shadow, self.encoder, cfg)
        frame = guard_frame(z) if cfg.min_cosine is not None else None
        anchor = guard(anchor, frame, cfg.min_cosine)
        if cfg.random_start or basis is not None:
            start = random_start(anchor, z, cfg) if cfg.random_start else anchor
            z_t = guard(kept_out(start, z, basis), frame, cfg.min_cosine)
        else:
            z_t = anchor.clone()
        z_t.requires_grad_(True)
        keys = row_keys(z, cfg.seed) if cfg.smoothing else None
        for t in range(cfg.steps):
            if keys is None:
                grad = gradient(shadow, self.encoder, z_t, x_shadow, z, cfg)  # per-sample sums; rows independent
            else:
                grad = smoothed_gradient(shadow, self.encoder, z_t, x_shadow, z, cfg, keys, t)
            with torch.no_grad():
                z_prev = z_t.detach().clone() if cfg.constraint == "per_step" else None
                z_t.add_(step_direction(grad, cfg.norm), alpha=cfg.alpha)
                z_t.copy_(guard(kept_out(project(z_t, z_prev, anchor, cfg), z, basis), frame, cfg.min_cosine))
        z_t = z_t.detach()
        return F.normalize(z_t, dim=1) if cfg.normalize else z_t
