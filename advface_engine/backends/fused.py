"""Fused backend: the reference loop with an explicit decoder backward, Triton kernels around the
convolutions, and (on a GPU) the whole protection of a batch captured once as a CUDA graph.

Per step, one call into the plan (DecoderPlan.step): y = S(z_t) (plan forward, saving only what
the backward needs); g = sign(y - x~) * head'(y) (kernels/head_conv.py with the last convolution,
or kernels/l1_sign.py); the plan's backward down to the first Linear; then g_h @ W with the sign
step, the projection and, on the last step, the L2 normalisation in the matmul's epilogue
(kernels/linear_step.py), the utility guard between the two. An ensemble sums its plans'
gradients at z (DecoderPlan.z_gradient) and takes the standalone step (kernels/sign_step.py).
With a keep_out basis the kernel steps and projects only, and reference.kept_out, the guard and the
last step's normalisation follow as torch operations (in the same graph). z, the anchor and the step
arithmetic are float32 whatever the decoder's dtype. Same semantics as reference.py: shadow_targets,
random_start, project, guard, kept_out.
"""

from __future__ import annotations

import contextlib
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ProtectConfig
from ..ensemble import ShadowEnsemble, members, which
from ..errors import UnsupportedModelError
from ..kernels import interpreted
from ..kernels.sign_step import sign_step_project
from ..principal import check_basis
from .encoder import CompiledEncoder, encode, faster_encoder
from .graphs import CaptureFailed, Captures, CudaGraph, EagerGraph, graph_size
from .modules import first_float, storages, weights_key
from .options import AUTOCAST_DTYPES, FUSED_DTYPES, check_fused_options
from .plan import build_plan
from .reference import basis_for, guard, guard_frame, kept_out, mean_direction, random_start

# the graph and encoder helpers, importable from here as well
__all__ = ["CompiledEncoder", "CudaGraph", "EagerGraph", "FusedBackend", "graph_size"]

CPU_DTYPES = ("fp32", "fp16")  # what Triton's interpreter computes correctly (it has no bfloat16)


@contextlib.contextmanager
def _tf32(enabled: bool):
    """TF32 in cuBLAS and cuDNN on or off for the call (fp32 means IEEE fp32 here), restored after.

    Set through the allow_tf32 flags, which keep every per-operation setting consistent (so their
    getters, which torch.compile reads, keep working inside); saved and restored exactly through
    the fp32_precision settings where torch has them (2.9+), whose getters never refuse as the
    legacy ones do once a caller has set conv and rnn differently."""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    knobs = [matmul, cudnn, getattr(cudnn, "conv", None), getattr(cudnn, "rnn", None)]
    if all(hasattr(knob, "fp32_precision") for knob in knobs):
        saved = [(knob, "fp32_precision", knob.fp32_precision) for knob in knobs]  # parent before children
    else:
        saved = [(matmul, "allow_tf32", matmul.allow_tf32), (cudnn, "allow_tf32", cudnn.allow_tf32)]
    matmul.allow_tf32 = cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)


def _on(device: torch.device):
    """Make ``device`` current for the call: Triton launches on the current CUDA device and stream."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


class FusedBackend:
    """Triton kernels + CUDA graphs; equals the reference backend up to rare sign flips.

    dtype:   decoder precision, "fp32" (default), "tf32", "bf16" or "fp16"; the encoder runs under
             autocast for bf16/fp16 (a copy of it with its BatchNorm folded and the weights autocast
             casts stored cast, see encoder.faster_encoder). z, anchor and steps stay float32. On a CPU
             (Triton's interpreter, for tests) fp32 and fp16 only.
    graphs:  on a GPU, capture the whole protection once per ``graph_size(B)`` and replay it; a
             batch is padded up to that size (a short last batch reuses the full batches' capture
             when graph_size maps both to it).
    split_k: split of the first Linear's gradient matmul (None: enough to fill the GPU).
    record_loss: keep the per-sample L1 loss of every step in ``self.losses`` (steps, B).
    channels_last: run the decoder's convolutions, and the encoder (a channels_last copy of it, when it
             gives E's features: one that flattens with .view does not), in NHWC layout: tensor
             cores' own, where cuDNN otherwise converts NCHW around each convolution. None
             (default): on for bf16 and fp16, off for fp32 and tf32. Same results up to rounding.
    compile_encoder: run the encoder (its copy, above) through torch.compile, which fuses its
             BatchNorm, PReLU and residual additions into fewer kernels; kept where its features are
             within rounding of E's. Off by default: a candidate for small batches, whose gain
             measurements disagree on (docs/benchmarks.md). The first call compiles, a second batch
             size once more (then dynamic), outside the CUDA graph; a compile that fails later warns
             and leaves E uncompiled. A CPU needs a C++ compiler.
    keep_out: a (k, D) basis with orthonormal rows whose span every iterate's change from z is kept out of,
             as in the reference backend (``reference.kept_out``, after the kernel's step and projection).

    The plan and the captured graphs are rebuilt when the models' weights change or move. When the
    graphs read only the backend's own tensors (the encoder as its copy, or not run), a call
    replays first and checks the weights while the GPU works (``_check_later``).
    """

    name = "fused"

    def __init__(self, shadow: nn.Module, encoder: nn.Module, config: ProtectConfig, dtype: str = "fp32",
                 graphs: bool = True, split_k: int | None = None, record_loss: bool = False,
                 channels_last: bool | None = None, compile_encoder: bool = False, keep_out: Tensor | None = None):
        check_fused_options(dict(dtype=dtype, graphs=graphs, split_k=split_k, record_loss=record_loss,
                                 channels_last=channels_last, compile_encoder=compile_encoder))
        if config.objective != "pixel":  # "auto" falls back to the reference backend, with a warning
            raise UnsupportedModelError(f"the fused backend steps on the pixel objective (Eq. 4) only, not "
                                        f"objective={config.objective!r}: use backend 'reference'")
        if config.smoothing:
            raise UnsupportedModelError(f"the fused backend takes the plain gradient, not smoothing="
                                        f"{config.smoothing}: use backend 'reference'")
        self.shadow, self.encoder, self.config = shadow, encoder, config
        self.dtype, self.graphs, self.split_k, self.record_loss = dtype, graphs, split_k, record_loss
        self.compile_encoder = compile_encoder
        self.basis = None if keep_out is None else check_basis(keep_out)  # the caller's; _build copies it
        self.channels_last = dtype in AUTOCAST_DTYPES if channels_last is None else channels_last
        self.losses: Tensor | None = None
        self.graph_type: type[CudaGraph] = CudaGraph
        self._graphs = Captures()
        self._build()

    def _build(self) -> None:
        """Plan the shadow decoder as it is now (device, dtype and weights); drop captured graphs."""
        like = first_float(self.shadow)
        device = like.device if like is not None else torch.device("cpu")
        if device.type != "cuda":
            if not interpreted():
                raise ValueError(f"the fused backend runs on a CUDA GPU and the shadow is on {device}: use a CUDA "
                                 "device, or backend 'reference' ('auto' picks it off the GPU); on a CPU the kernels "
                                 "run only under Triton's interpreter (TRITON_INTERPRET=1, for tests)")
            if self.dtype not in CPU_DTYPES:
                raise ValueError(f"dtype {self.dtype!r} needs a GPU; the Triton interpreter runs fp32 and fp16 only")
        self.plans = []  # one per shadow of an ensemble
        for k, shadow in enumerate(members(self.shadow)):
            try:
                self.plans.append(build_plan(shadow, FUSED_DTYPES[self.dtype], device, self.channels_last,
                                             self.dtype == "tf32"))
            except UnsupportedModelError as err:
                if isinstance(self.shadow, ShadowEnsemble):
                    raise UnsupportedModelError(f"{which(self.shadow, k)}: {err}") from err
                raise
        self.plan = self.plans[0]
        # the backend's own float32 copy on the plans' device: the graphs read it, never the caller's tensor
        self.keep_out = None if self.basis is None else self.basis.to(device, torch.float32, copy=True)
        self._graphs.clear()
        self._encoder_copy: tuple[nn.Module, bool] | None | bool = False  # False: not tried yet (_encoder_for)
        self._own_memory: bool | None = None  # whether the graphs read only the backend's tensors (_check_later)
        self._key = weights_key(self.shadow, self.encoder)

    # -- the algorithm, written once for eager runs and graph capture --------------------------

    def targets(self, z: Tensor, frame: tuple[Tensor, Tensor] | None = None) -> tuple[list[Tensor], Tensor]:
        """x~_k = S_k(z) per shadow (through the plans, so that z_t == z gives exact ties) and the fp32 anchor
        (Eq. 3, reference.shadow_targets), on the guard's cap when ``frame`` (guard_frame(z)) is given."""
        x_shadow = [plan.forward(z, keep=False)[0] for plan in self.plans]
        if self.config.anchor == "shadow":
            used = x_shadow if self.config.ensemble_anchor == "mean" else x_shadow[:1]
            anchors = [self._encode(x).float() for x in used]
            anchor = anchors[0] if len(anchors) == 1 else mean_direction(anchors)
        else:
            anchor = z.float().clone()
        if self.config.normalize:
            anchor = F.normalize(anchor, dim=1)
        if frame is not None:
            anchor = guard(anchor, frame, self.config.min_cosine)
        return x_shadow, anchor.contiguous()

    def _encode(self, x_shadow: Tensor) -> Tensor:
        """E(x~), through the encoder ``_encoder_for`` gives."""
        encoder, nhwc = self._encoder_for(x_shadow)
        return encode(x_shadow, encoder, self.dtype, nhwc)

    def _encoder_for(self, x_shadow: Tensor) -> tuple[nn.Module, bool]:
        """(encoder, NHWC input?) to run: E, or the faster copy of it that faster_encoder chose on the
        first batch (eagerly, before any capture: warm-up runs come first)."""
        if self._encoder_copy is False:
            capturing = x_shadow.is_cuda and torch.cuda.is_current_stream_capturing()
            self._encoder_copy = None if capturing else faster_encoder(
                self.encoder, x_shadow, self.dtype, self.channels_last, self.compile_encoder)
        return self._encoder_copy or (self.encoder, False)

    def gradient(self, z_t: Tensor, x_shadow: list[Tensor], loss: Tensor | None = None) -> Tensor:
        """g_t of Eq. 4 with respect to z, summed over the shadows (materialised: the loop of an ensemble;
        for one shadow, tests and inspection)."""
        total = None
        for plan, x in zip(self.plans, x_shadow):
            grad = plan.z_gradient(z_t, x, loss)
            total = grad if total is None else total.add_(grad)
        return total

    def step(self, z_t: Tensor, anchor: Tensor, x_shadow: list[Tensor], last: bool, loss: Tensor | None = None,
             z_low: Tensor | None = None, frame: tuple[Tensor, Tensor] | None = None, z: Tensor | None = None) -> None:
        """z_t <- Cap(Proj(z_t + alpha * sign(g_t))) in place (unit-norm after the last step if normalize);
        with a keep_out basis Cap(Keep(Proj(.))), Keep taking the change from ``z`` (the caller's features).

        ``x_shadow``: targets()'s images, one per shadow. ``z_low``: z_t in the decoder's dtype, which the
        decoder reads instead of casting z_t, and which the step kernel rewrites with the new z_t (one cast
        kernel less per step). ``frame``: the guard's guard_frame(z), None without the guard. One shadow:
        its plan's step (g_h @ W and the step in one kernel, DecoderPlan.step); an ensemble: the summed
        gradient, then the standalone step."""
        cfg = self.config
        keep = self.keep_out is not None  # then the kernel steps and projects, and the rest follows here
        normalize = cfg.normalize and last
        args = (cfg.alpha, cfg.eps, cfg.norm, cfg.constraint, normalize and not keep)
        cap = None if frame is None or keep else (*frame, cfg.min_cosine)
        z_in = z_t if z_low is None else z_low  # what the decoders read
        z_low = None if last else z_low  # nothing reads it after the last step
        kernel_low = None if keep else z_low
        if len(self.plans) == 1:
            self.plan.step(z_t, anchor, x_shadow[0], *args, loss=loss, z_in=z_in, z_low=kernel_low, guard=cap,
                           split_k=self.split_k)
        else:
            sign_step_project(z_t, self.gradient(z_in, x_shadow, loss), anchor, *args, z_low=kernel_low, guard=cap)
        if keep:
            z_t.copy_(guard(kept_out(z_t, z, self.keep_out), frame, cfg.min_cosine))
            if normalize:
                z_t.copy_(F.normalize(z_t, dim=1))
            if z_low is not None:
                z_low.copy_(z_t)

    def protect(self, z: Tensor, noise: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """The whole protection of a batch (no host synchronisation, so it can be captured)."""
        cfg = self.config
        frame = None if cfg.min_cosine is None else tuple(t.contiguous() for t in guard_frame(z))
        x_shadow, anchor = self.targets(z, frame)
        if noise is not None or self.keep_out is not None:
            start = anchor + noise if noise is not None else anchor
            z_t = guard(kept_out(start, z, self.keep_out), frame, cfg.min_cosine)
        else:
            z_t = anchor.clone()
        z_low = z_t.to(self.plan.dtype) if self.plan.dtype != torch.float32 else None  # then kept by the steps
        losses = torch.zeros(cfg.steps, z.shape[0], device=z.device) if self.record_loss else None
        for t in range(cfg.steps):
            self.step(z_t, anchor, x_shadow, last=t == cfg.steps - 1, loss=None if losses is None else losses[t],
                      z_low=z_low, frame=frame, z=z)
        if cfg.steps == 0 and cfg.normalize:
            z_t = F.normalize(z_t, dim=1)
        return z_t, losses

    # -- entry point --------------------------------------------------------------------------

    def run(self, z: Tensor) -> Tensor:
        if self._check_later(z):
            z_adv = self._replay_first(z, lambda key: key != self._key)
            if z_adv is not None:
                return z_adv
        elif weights_key(self.shadow, self.encoder) != self._key:
            self._build()
        if z.shape[0] == 0:
            self.losses = None
            return z.clone()
        return self._run(z)

    def run_replay(self, z: Tensor) -> Tensor | None:
        """``run`` for callers that freeze the models around every call (a Protector), where they can
        replay first (``_check_later``): the replay, then a check of the weights' tensors but not of
        the modules' modes (which frozen would make eval anyway), all without the models frozen. None
        (nothing left to wait for) where a replay cannot come first, or the tensors changed: then the
        caller runs ``run`` under frozen, which captures anew."""
        return self._replay_first(z, lambda key: key[0] != self._key[0]) if self._check_later(z) else None

    def _replay_first(self, z: Tensor, changed) -> Tensor | None:
        """The replay, then the weights checked while the GPU runs it; None when ``changed(weights_key)``
        says they changed: that result is dropped and the plan rebuilt (after the replay is done, as
        its graph's memory is released with it), for the call to run again."""
        z_adv = self._run(z)
        if not changed(weights_key(self.shadow, self.encoder)):
            return z_adv
        if z.is_cuda:
            torch.cuda.current_stream(z.device).synchronize()
        self._build()
        return None

    def _run(self, z: Tensor) -> Tensor:
        """The protection of a non-empty batch on the current plan: replayed, or eager; sets losses."""
        z32 = z.float().contiguous()
        basis_for(self.keep_out, z32)  # its dimension checked before anything runs
        noise = None
        if self.config.random_start:  # seeded from z's rows as the caller gave them, like the reference
            noise = random_start(torch.zeros_like(z32), z, self.config)
        with torch.no_grad(), _tf32(self.dtype == "tf32"), _on(z32.device):
            if self.graphs and (z32.is_cuda or self.graph_type.eager):
                z_adv, losses = self._replay(z32, noise)
            else:
                z_adv, losses = self.protect(z32, noise)
        self.losses = losses
        return z_adv.to(z.dtype)

    def _check_later(self, z: Tensor) -> bool:
        """Whether this call may replay a captured graph first and check the models' weights while the
        GPU runs it: the graph for z's batch size exists and reads no tensor of the caller's models
        (the plan holds its own; the encoder must be the backend's copy, sharing no memory with E, or
        not run at all). A replay on changed weights then reads only stale copies, and is redone."""
        if z.shape[0] == 0 or not self.graphs or graph_size(z.shape[0]) not in self._graphs:
            return False
        if self._own_memory is None:  # the encoder's copy is chosen at the first capture
            encoder = self._encoder_copy[0] if self._encoder_copy else None
            self._own_memory = self.config.anchor != "shadow" or (
                encoder is not None and not storages(encoder) & storages(self.encoder))
        return self._own_memory

    # -- CUDA graphs --------------------------------------------------------------------------

    def _replay(self, z: Tensor, noise: Tensor | None) -> tuple[Tensor, Tensor | None]:
        try:
            return self._graphs.run(self.protect, self.graph_type, z, noise)
        except CaptureFailed as failed:
            err = failed.__cause__
            cause = f"{err}" + (f" (after: {err.__context__})" if err.__context__ else "")
            warnings.warn(f"CUDA graph capture failed ({cause}); running eagerly", stacklevel=3)
            self.graphs = False
            return self.protect(z, noise)
