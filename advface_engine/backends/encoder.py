"""The encoder as the fused backend runs it for the anchor E(S(z)): under autocast in bf16/fp16, and a
faster copy of E where one gives E's features (BatchNorm folded, weights stored cast, NHWC layout,
torch.compile), each kept only where it is checked to give them."""

from __future__ import annotations

import contextlib
import copy
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .modules import as_input_of, autocast_copy, compute_dtypes, first_float, fold_encoder_batchnorm
from .options import AUTOCAST_DTYPES, FUSED_DTYPES

COPY_COSINE = 0.99  # least cosine between E's features and its faster copy's, on the first image


class CompiledEncoder(nn.Module):
    """``torch.compile(encoder)`` or, from the first call whose compilation fails (a later batch size
    recompiles), the encoder itself: a warning, then uncompiled for good, so a call never fails for
    it. Shapes as torch.compile's default: the first call's static (fastest for a fixed online
    size), a second batch size once more with that dimension dynamic (B=1 is always its own)."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder, self.compiled = encoder, torch.compile(encoder)
        self.failure: str | None = None
        self.warn = False  # on once the backend's own check is done (it reports a first failure itself)

    def forward(self, x: Tensor) -> Tensor:
        if self.failure is None:
            config, exc = torch._dynamo.config, torch._dynamo.exc
            # past its recompile limit dynamo would run E uncompiled without a word: an error here instead
            # (names since torch 2.7, before as "cache" limit; with suppress_errors on, dynamo's own way)
            flag = next((name for name in ("fail_on_recompile_limit_hit", "fail_on_cache_limit_hit")
                         if hasattr(config, name)), None)
            limit_hit = getattr(exc, "FailOnRecompileLimitHit", None) or getattr(exc, "FailOnCacheLimitHit", ())
            strict = config.patch(flag, True) if flag and not config.suppress_errors else contextlib.nullcontext()
            try:
                with strict:
                    return self.compiled(x)
            except limit_hit:
                limit = getattr(config, "recompile_limit", None) or getattr(config, "cache_size_limit", None)
                self.failure = (f"torch.compile's recompile limit for the encoder was reached (torch._dynamo.config."
                                f"recompile_limit = {limit} compilations of its forward's code in a process)")
            except exc.TorchDynamoException as err:
                self.failure = f"{type(err).__name__}: {str(err)[:500]}"
            if self.warn:
                warnings.warn(f"torch.compile of the encoder failed; it runs uncompiled ({self.failure})",
                              stacklevel=2)
        return self.encoder(x)


def encode(x_shadow: Tensor, encoder: nn.Module, dtype: str, nhwc: bool = False) -> Tensor:
    """E(x~) for the fused backend's ``dtype``: under autocast for bf16/fp16, else in E's dtype; NHWC input
    for a channels_last copy, else contiguous."""
    layout = torch.channels_last if nhwc else torch.contiguous_format
    if dtype in AUTOCAST_DTYPES:
        with torch.autocast(x_shadow.device.type, dtype=FUSED_DTYPES[dtype], cache_enabled=False):  # graph-safe
            return encoder(x_shadow.contiguous(memory_format=layout))
    return encoder(as_input_of(encoder, x_shadow, torch.float32).contiguous(memory_format=layout))


def faster_encoder(encoder: nn.Module, x_shadow: Tensor, dtype: str, channels_last: bool,
                   compile_encoder: bool) -> tuple[nn.Module, bool] | None:
    """A copy of E that gives E's features with less work, checked on x~, and whether it takes NHWC
    input; None: E itself.

    bf16/fp16: first E's eval BatchNorms folded into the convolutions before them (torch.fx,
    fold_encoder_batchnorm), kept if its features are within rounding of E's (cosine >=
    COPY_COSINE); then the weights autocast casts at every call stored cast (autocast_copy), kept
    only if its features equal those of the copy it was made from to the bit. channels_last: that
    copy (or one of E) laid out NHWC, kept if its features are within rounding of E's (E may
    flatten with .view, which NHWC activations refuse, or read memory in NCHW order).
    compile_encoder: the result through torch.compile, kept within rounding too. A second set of
    E's weights on the device until the next rebuild; made once, so hooks added to E later do not
    reach it. Whatever fails is said in one warning. The checks run on the first image, compilation
    on the whole batch (its shape is the one the graph replays)."""
    if first_float(encoder) is None:  # nothing to cast or lay out (an ONNX session's encoder)
        return None
    image = x_shadow[:1]
    want = encode(image, encoder, dtype)
    chosen, problems, kept = None, [], []

    def close(candidate: tuple[nn.Module, bool], where: Tensor, reference: Tensor) -> float:
        got = encode(where, candidate[0], dtype, candidate[1]).float().flatten(1)
        return F.cosine_similarity(got, reference.float().flatten(1)).min().item()

    if dtype in AUTOCAST_DTYPES:
        base, base_out = encoder, want
        try:
            folded = fold_encoder_batchnorm(encoder)
            if folded is not None and compute_dtypes(lambda: encode(image, folded, dtype)) \
                    != compute_dtypes(lambda: encode(image, encoder, dtype)):
                folded = None
                problems.append("with its BatchNorm folded: the traced copy runs layers in other precisions "
                                "(torch.fx keeps no autocast of the encoder's own)")
            cosine = None if folded is None else close((folded, False), image, want)
            if cosine is not None and cosine >= COPY_COSINE:
                chosen, base, base_out = (folded, False), folded, encode(image, folded, dtype)
                kept.append("BatchNorm folded")
            elif cosine is not None:
                problems.append(f"with its BatchNorm folded its features differ (cosine {cosine:.4f})")
        except Exception as err:  # noqa: BLE001 - any failure (E cannot be traced): without that copy
            problems.append(f"with its BatchNorm folded: {type(err).__name__}: {str(err)[:300]}")
        try:
            cast = autocast_copy(base, FUSED_DTYPES[dtype])
            if cast is not None and torch.equal(encode(image, cast, dtype), base_out):
                chosen = (cast, False)
                kept.append(f"{dtype} weights")
            elif cast is not None:
                problems.append(f"with its weights stored in {dtype} its features change")
        except Exception as err:  # noqa: BLE001 - any failure: without that copy
            problems.append(f"with its weights stored in {dtype}: {type(err).__name__}: {err}")
    if channels_last:
        try:
            nhwc = copy.deepcopy(chosen[0] if chosen else encoder).to(memory_format=torch.channels_last)
            cosine = close((nhwc, True), image, want)
            if cosine >= COPY_COSINE:  # NaN fails too
                chosen = (nhwc, True)
                kept.append("NHWC layout")
            else:
                problems.append(f"in NHWC layout its features differ (cosine {cosine:.4f})")
        except Exception as err:  # noqa: BLE001 - any failure: without that copy
            problems.append(f"in NHWC layout: {type(err).__name__}: {err}")
    if compile_encoder:
        base, nhwc = chosen or (encoder, False)
        try:
            compiled = CompiledEncoder(base)
            cosine = close((compiled, nhwc), x_shadow, encode(x_shadow, base, dtype, nhwc))
            compiled.warn = True
            if compiled.failure is not None:
                problems.append(f"through torch.compile: {compiled.failure}")
            elif cosine >= COPY_COSINE:
                chosen = (compiled, nhwc)
                kept.append("torch.compile")
            else:
                problems.append(f"through torch.compile its features differ (cosine {cosine:.4f})")
        except Exception as err:  # noqa: BLE001 - any failure (no compiler here, say): without it
            problems.append(f"through torch.compile: {type(err).__name__}: {str(err)[:500]}")
    if problems:
        runs = f"with {', '.join(kept)}" if kept else "as it is"
        warnings.warn(f"the encoder runs {runs}; left out: {'; '.join(problems)}", stacklevel=5)
    return chosen
