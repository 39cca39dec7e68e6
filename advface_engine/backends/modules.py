"""Walking and transforming modules: faster but equal forms of a decoder (eval BatchNorm folded into the
layer before it, a channels_last layout) and of an encoder (BatchNorm folded, the weights autocast casts
stored cast); the rules both backends follow for these (``batchnorm_site``, ``opens_image``); the
modules' tensors and a key that changes when their weights change (to rebuild what was made of them)."""

from __future__ import annotations

import collections
import copy
import itertools
import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_conv_bn_weights


def first_float(module: nn.Module) -> Tensor | None:
    """The module's first floating parameter or buffer: its device and dtype (None if it has none)."""
    return next((t for t in itertools.chain(module.parameters(), module.buffers()) if t.is_floating_point()), None)


def as_input_of(module: nn.Module, x: Tensor, default: torch.dtype | None = None) -> Tensor:
    """``x`` in the dtype of ``module``'s weights, so an encoder may run in another dtype than the
    shadow (a module without weights gets ``default``; None: x's dtype), and contiguous: a
    channels_last shadow image would break an encoder that flattens with ``.view``."""
    like = first_float(module)
    dtype = like.dtype if like is not None else default
    return (x if dtype is None else x.to(dtype)).contiguous()


def unflattened_shape(unflatten: nn.Unflatten, features: int | None = None) -> list[int]:
    """The sizes an Unflatten of dim 1 makes of rows of ``features`` values: a -1 among them inferred."""
    shape = list(unflatten.unflattened_size)
    if features is not None and shape.count(-1) == 1:
        shape[shape.index(-1)] = features // -math.prod(shape)
    return shape


def batchnorm_site(layers: Sequence[nn.Module], i: int) -> tuple[int, int] | None:
    """Where the BatchNorm ``layers[i]`` folds, in layers applied one after another: (index of the
    Linear or convolution whose output it normalises, values per channel of that output), or None.

    The layer right before it, or a Linear before a reshape of its output (an Unflatten of dim 1 into
    (C, H, W): H*W values per channel; a Flatten, which leaves its rows as they are); a Conv2d, or a
    ConvTranspose2d of one group (a grouped one's weight does not hold the output channels along one
    dimension); and only where that layer's output channels are the BatchNorm's. The reference folds
    with it in a copy of the modules (``fold_batchnorm``), the fused plan in its ops (``build_plan``)."""
    j, per_channel = i - 1, 1
    if j >= 1 and isinstance(layers[j - 1], nn.Linear):
        reshape, linear = layers[j], layers[j - 1]
        if isinstance(reshape, nn.Unflatten) and reshape.dim in (1, -1):
            j, per_channel = j - 1, math.prod(unflattened_shape(reshape, linear.out_features)[1:])
        elif isinstance(reshape, nn.Flatten) and reshape.start_dim == 1 and reshape.end_dim == -1:
            j = j - 1
    layer = layers[j] if j >= 0 else None
    if isinstance(layer, nn.Linear):
        channels = layer.out_features // per_channel if per_channel > 0 else None
    elif isinstance(layer, nn.Conv2d) or (isinstance(layer, nn.ConvTranspose2d) and layer.groups == 1):
        channels = layer.out_channels
    else:
        return None
    return (j, per_channel) if channels == layers[i].num_features else None


def fold_batchnorm(shadow: nn.Module) -> nn.Module:
    """A frozen copy of S in which every eval-mode BatchNorm that follows a Linear or convolution in
    an nn.Sequential (``batchnorm_site``) is folded into that layer's weight and bias.

    An eval BatchNorm is a per-channel affine map, so the copy is the same function (folded in
    float64, rounded once) with one layer less to run forward and backward at every step.
    """
    folded = copy.deepcopy(shadow).requires_grad_(False)
    for seq in [m for m in folded.modules() if isinstance(m, nn.Sequential)]:
        for i in range(1, len(seq)):
            bn = seq[i]
            if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or bn.training or bn.running_var is None:
                continue
            site = batchnorm_site(seq, i)
            if site is None:
                continue
            layer, per_channel = seq[site[0]], site[1]
            stats = [None if t is None else t.double().repeat_interleave(per_channel)
                     for t in (bn.running_mean, bn.running_var, bn.weight, bn.bias)]
            layer.weight, layer.bias = fuse_conv_bn_weights(layer.weight, layer.bias, stats[0], stats[1], bn.eps,
                                                            stats[2], stats[3], isinstance(layer, nn.ConvTranspose2d))
            seq[i] = nn.Identity()
    return folded


# a convolution and the BatchNorm that normalises its channels (dim 1 of its output)
FOLDABLE = {nn.Conv1d: nn.BatchNorm1d, nn.Conv2d: nn.BatchNorm2d, nn.Conv3d: nn.BatchNorm3d}


def fold_encoder_batchnorm(encoder: nn.Module) -> nn.Module | None:
    """A copy of E (traced by torch.fx) in which each eval BatchNorm whose input is the output of a
    convolution, used by nothing else, is folded into it: one kernel less per such pair at every
    call (iresnet50: 53 of its 79). None when nothing folds, or for TorchScript or an E with forward
    hooks. Raises when E cannot be traced (Python control flow on tensor values).

    Only exact Conv1d/2d/3d -> BatchNorm1d/2d/3d pairs, each layer called at one place and its
    parameters read nowhere else. The same function up to rounding, not to the bit; a trace keeps
    no Python context such as E's own autocast (see compute_dtypes): the caller checks both."""
    if isinstance(encoder, torch.jit.ScriptModule) or any(m._forward_pre_hooks or m._forward_hooks
                                                          for m in encoder.modules()):
        return None  # TorchScript is not traced by torch.fx, and a trace would not keep the hooks
    traced = torch.fx.symbolic_trace(copy.deepcopy(encoder))
    modules = dict(traced.named_modules())
    nodes = list(traced.graph.nodes)
    calls = collections.Counter(node.target for node in nodes if node.op == "call_module")
    read = {node.target.rpartition(".")[0] for node in nodes if node.op == "get_attr"}  # owners of direct reads
    folded = 0
    for node in nodes:
        bn = modules.get(node.target) if node.op == "call_module" else None
        before = node.args[0] if bn is not None and len(node.args) == 1 and not node.kwargs else None
        if not isinstance(before, torch.fx.Node) or before.op != "call_module" or len(before.users) != 1:
            continue
        layer = modules[before.target]
        if (FOLDABLE.get(type(layer)) is not type(bn) or bn.training or layer.training or bn.running_var is None
                or layer.out_channels != bn.num_features or calls[node.target] != 1 or calls[before.target] != 1
                or node.target in read or before.target in read):
            continue
        fused = fuse_conv_bn_eval(layer, bn)
        parent, _, name = before.target.rpartition(".")
        setattr(traced.get_submodule(parent), name, fused)
        modules[before.target] = fused  # a second BatchNorm after it folds into the folded layer
        node.replace_all_uses_with(before)
        traced.graph.erase_node(node)
        folded += 1
    if not folded:
        return None
    traced.delete_all_unused_submodules()
    traced.recompile()
    return traced


def compute_dtypes(run) -> list[torch.dtype]:
    """The dtype of each convolution, matmul and attention, in order, while ``run()`` runs: what autocast (the
    caller's, or a module's own) decided. A traced copy that lost E's own autocast differs here."""
    from torch.utils._python_dispatch import TorchDispatchMode

    ops = {"convolution", "addmm", "mm", "bmm", "baddbmm", "addmv", "mv", "dot"}
    seen: list[torch.dtype] = []

    class Recording(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = func.overloadpacket.__name__
            if name in ops or name.startswith("_scaled_dot_product"):  # attention: its own kernels
                seen.append((out[0] if isinstance(out, tuple) else out).dtype)
            return out

    with Recording():
        run()
    return seen


class ChannelsLast(nn.Module):
    """Identity on values; lays a 4-D activation out channels_last."""

    def forward(self, x: Tensor) -> Tensor:
        return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


# layers whose input-gradient backward never reads their output, and modules that pass values through
OUTPUT_UNUSED = (nn.Linear, nn.Conv2d, nn.ConvTranspose2d, nn.modules.batchnorm._BatchNorm)
PASS_THROUGH = (nn.Identity, nn.Flatten, nn.Unflatten, ChannelsLast)


def global_forward_hooks() -> bool:
    """Whether any forward or forward pre-hook is registered for every module (``register_module_forward_hook``)."""
    return bool(nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks)


def inplace_activations(shadow: nn.Module) -> nn.Module:
    """``shadow`` with each ReLU (and LeakyReLU of slope >= 0) made in-place where the tensor it overwrites
    is the fresh output of a Linear, convolution or BatchNorm before it in a plain nn.Sequential (through
    Identity, reshapes and ChannelsLast), in a shadow without forward hooks: nothing else reads that tensor,
    forward or backward. One activation-sized tensor less to allocate per activation and step, the same
    values."""
    def backwards(module: nn.Module) -> list[nn.Module]:  # the modules a value went through, last first
        if isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward:
            return [m for child in reversed(module) for m in backwards(child)]
        return [module]

    if global_forward_hooks() or any(m._forward_hooks or m._forward_pre_hooks for m in shadow.modules()):
        return shadow  # a forward (pre-)hook may keep a tensor an activation would overwrite
    for seq in [m for m in shadow.modules() if isinstance(m, nn.Sequential)]:
        if type(seq).forward is not nn.Sequential.forward:  # a forward of its own may read any layer's output
            continue
        for i, act in enumerate(seq):
            if not (type(act) is nn.ReLU or (type(act) is nn.LeakyReLU and act.negative_slope >= 0)):
                continue
            before = [m for child in reversed(list(seq)[:i]) for m in backwards(child)]
            made = next((m for m in before if not isinstance(m, PASS_THROUGH)), None)
            if isinstance(made, OUTPUT_UNUSED):
                act.inplace = True
    return shadow


def opens_image(module: nn.Module) -> bool:
    """Whether ``module`` turns flat features into (C, H, W) images (an Unflatten of dim 1 into three
    sizes): where a decoder's NHWC layout begins, in the reference (``channels_last``) and in the fused
    plan (its stem Linear then writes NHWC order, ``plan.Linear.to_channels_last``)."""
    return isinstance(module, nn.Unflatten) and module.dim in (1, -1) and len(module.unflattened_size) == 3


def channels_last(shadow: nn.Module) -> nn.Module:
    """``shadow`` with channels_last weights and activations, from the first image on (``opens_image``),
    so that every convolution and activation sees one memory layout."""
    for seq in [m for m in shadow.modules() if isinstance(m, nn.Sequential)]:
        for i, layer in enumerate(seq):
            if opens_image(layer):
                seq[i] = nn.Sequential(layer, ChannelsLast())
    return shadow.to(memory_format=torch.channels_last)


# the layers whose every floating argument autocast casts to its lower precision (conv*, linear, prelu)
AUTOCAST_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
                   nn.Linear, nn.PReLU)


def autocast_copy(encoder: nn.Module, dtype: torch.dtype) -> nn.Module | None:
    """A copy of E for runs under ``torch.autocast(dtype=dtype)``, with the weights autocast casts at every
    call stored cast; None when there is nothing to cast.

    Autocast without its cache (a CUDA graph cannot hold it) casts the weights of E's convolutions,
    Linear and PReLU layers at every call, one kernel each; the copy does it once, with the same
    rounding. Only those exact layer types, and float32/float16/bfloat16 weights (autocast leaves
    float64 alone). The same output to the bit is expected, not assumed: weight hooks (old-style
    weight_norm, spectral_norm), a weight used elsewhere or an autocast of E's own would break it,
    so the caller checks (encoder.faster_encoder).
    """
    def castable(m: nn.Module) -> bool:
        tensors = list(itertools.chain(m.parameters(recurse=False), m.buffers(recurse=False)))
        return (type(m) in AUTOCAST_LAYERS and all(t.dtype != torch.float64 for t in tensors)
                and any(t.is_floating_point() and t.dtype != dtype for t in tensors))

    if not any(castable(m) for m in encoder.modules()):
        return None
    copied = copy.deepcopy(encoder)
    for m in [m for m in copied.modules() if castable(m)]:
        m.to(dtype)
    return copied


def submodules(*roots: nn.Module) -> list[nn.Module]:
    """Every module under ``roots`` once, parents first: one walk over the ``_modules`` dicts, cheaper
    than ``modules()`` and ``parameters()`` (each call of a Protector walks its models)."""
    seen: set[int] = set()
    found: list[nn.Module] = []
    stack = list(reversed(roots))
    while stack:
        module = stack.pop()
        if id(module) not in seen:
            seen.add(id(module))
            found.append(module)
            stack.extend(child for child in reversed(module._modules.values()) if child is not None)
    return found


def own_parameters(modules: list[nn.Module]) -> list[Tensor]:
    """The parameters registered on each of ``modules`` (not their children's: pass submodules())."""
    return [p for m in modules for p in m._parameters.values() if p is not None]


def own_tensors(modules: list[nn.Module]) -> list[Tensor]:
    """The parameters and buffers registered on each of ``modules`` (pass submodules())."""
    return own_parameters(modules) + [b for m in modules for b in m._buffers.values() if b is not None]


def storages(*modules: nn.Module) -> set[int]:
    """Addresses of the memory that the tensors of ``modules`` use: parameters, buffers and tensors
    held as plain attributes (what a forward can read besides its input)."""
    found = submodules(*modules)
    tensors = own_tensors(found) + [v for m in found for v in vars(m).values() if isinstance(v, Tensor)]
    return {ptr for t in tensors if (ptr := t.untyped_storage().data_ptr())}


def weights_key(*modules: nn.Module) -> tuple:
    """Changes whenever a parameter or buffer of ``modules`` is replaced (even by a view of its own
    storage), moved or modified in place, or a mode flips. (Edits through ``.data`` bypass the version
    counters: build a new backend after them.)"""
    found = submodules(*modules)
    return tuple((id(t), t.data_ptr(), t._version) for t in own_tensors(found)), tuple(m.training for m in found)
