"""Core subcommands: train-encoder, train-shadow, demo and check-kernels (protect lives in gallery/command.py)."""

from __future__ import annotations

import argparse

import numpy as np
import torch

from .config_args import add_renamed, positive_int


def add_image_args(p: argparse.ArgumentParser, identities: int = 200, per_identity: int = 10) -> None:
    g = p.add_argument_group("training images (default: built-in synthetic faces)")
    g.add_argument("--images", help="image folder, one sub-folder per identity")
    g.add_argument("--images-npy", help=".npy array of images, (N, H, W, 3) uint8 or (N, 3, H, W) in [-1, 1]")
    g.add_argument("--labels-npy", help=".npy identity labels for --images-npy (encoder training)")
    g.add_argument("--synthetic-identities", type=positive_int, default=identities,
                   help=f"synthetic identities to render (default {identities})")
    g.add_argument("--per-identity", type=positive_int, default=per_identity,
                   help=f"synthetic faces per identity (default {per_identity})")
    g.add_argument("--first-identity", type=int, default=0, help="synthetic identity offset (disjoint sets)")
    g.add_argument("--data-seed", type=int, default=0, help="seed of the synthetic faces (default 0)")


def load_images(args: argparse.Namespace, size: int):
    """The training images named by the flags, at ``size`` x ``size``, and labels when known. An image
    folder or ``.npy`` file is read batch by batch during training (it may be larger than memory)."""
    from .data import ImageFolder, NpyImages, synthetic_faces

    if args.images:
        folder = ImageFolder(args.images, size)
        return folder, folder.labels
    if args.images_npy:
        images = NpyImages(args.images_npy, size)
        labels = torch.from_numpy(np.load(args.labels_npy, allow_pickle=False)) if args.labels_npy else None
        if labels is not None and len(labels) != len(images):
            raise ValueError(f"{args.labels_npy} holds {len(labels)} labels for {len(images)} images")
        return images, labels
    return synthetic_faces(args.synthetic_identities, args.per_identity, size, args.data_seed, args.first_identity)


def add_train_args(p: argparse.ArgumentParser, epochs: int, lr: float, batch_size: int) -> None:
    p.add_argument("--epochs", type=positive_int, default=epochs, help=f"passes over the images (default {epochs})")
    p.add_argument("--batch-size", type=positive_int, default=batch_size,
                   help=f"images per step (default {batch_size})")
    p.add_argument("--lr", type=float, default=lr, help=f"Adam learning rate, cosine schedule (default {lr})")
    p.add_argument("--seed", type=int, default=0, help="initial weights and data order (default 0)")
    p.add_argument("--checkpoint", help="training state file: written every epoch, resumed from if present")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default auto: cuda when available)")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar (on a terminal) or progress lines (in a log)")


def cmd_train_encoder(args: argparse.Namespace) -> int:
    from .devices import resolve_device
    from .models import build_model
    from .train import train_encoder

    torch.manual_seed(args.seed)  # the initial weights: same seed, same encoder
    encoder = build_model(args.encoder_arch, num_features=args.dim, input_size=args.size,
                          **({"width": args.width} if args.encoder_arch == "mobilefacenet" else {}))
    encoder = encoder.to(resolve_device(args.device))
    images, labels = load_images(args, args.size)
    if labels is None:
        raise ValueError("encoder training needs identity labels (--images folder or --labels-npy)")
    history = train_encoder(encoder, images, labels, args.epochs, args.batch_size, args.lr, args.seed,
                            args.checkpoint, args.output, progress=args.progress)
    print(f"trained {args.encoder_arch} on {len(images)} faces: final loss {history[-1]:.4f} -> {args.output}")
    return 0


def cmd_train_shadow(args: argparse.Namespace) -> int:
    from .data import take
    from .devices import resolve_device
    from .errors import BadFeaturesError
    from .models import build_model, load_encoder
    from .train import train_decoder

    device = resolve_device(args.device)
    encoder = load_encoder(args.encoder, args.encoder_arch, device)
    size = args.size or getattr(encoder, "input_size", None)
    if size is None:
        raise ValueError("the encoder does not record its input size: pass --size")
    images, _ = load_images(args, size)
    if len(images) == 0:
        raise ValueError("no training images")
    with torch.no_grad():
        dim = encoder(take(images, [0]).to(device)).shape[1]
    torch.manual_seed(args.seed)  # the initial weights: same seed, same decoder
    decoder = build_model(args.shadow_arch, feature_dim=dim, size=size, width=args.width).to(device)
    try:
        history = train_decoder(decoder, encoder, images, args.epochs, args.batch_size, args.lr,
                                not args.no_normalize, args.seed, args.checkpoint, args.output,
                                identity_weight=args.identity_weight, progress=args.progress)
    except BadFeaturesError as err:
        raise BadFeaturesError(f"--encoder {args.encoder}: {err}", err.rows) from None
    print(f"trained {args.shadow_arch} decoder on {len(images)} faces: final loss {history[-1]:.4f} -> {args.output}")
    return 0


def cmd_check_kernels(args: argparse.Namespace) -> int:
    """The ahead-of-time kernel check (kernels/aot.py) for what the fused backend launches kernels for."""
    from .backends.launches import fused_launches
    from .kernels import aot

    return aot.run(args, fused_launches())


def register(sub: argparse._SubParsersAction) -> None:
    from .demo import add_demo_parser
    from .kernels.aot import add_arguments as add_kernel_check_args

    p = sub.add_parser("train-encoder", help="train a small recognition encoder (CosFace) on labelled faces")
    p.add_argument("--output", required=True, help="encoder checkpoint (.safetensors)")
    add_renamed(p, "--encoder-arch", "--arch", default="mobilefacenet", metavar="ARCH",
                help="mobilefacenet or iresnet18/34/50/100 (default mobilefacenet)")
    p.add_argument("--dim", type=positive_int, default=128, help="feature dimension (default 128)")
    p.add_argument("--size", type=positive_int, default=32, help="input image size (default 32)")
    p.add_argument("--width", type=positive_int, default=16, help="mobilefacenet channel width (default 16)")
    add_image_args(p)
    add_train_args(p, epochs=8, lr=2e-3, batch_size=128)
    p.set_defaults(func=cmd_train_encoder)

    p = sub.add_parser("train-shadow", help="train a shadow (or attacker) decoder on (E(x), x) pairs, Eq. 1")
    p.add_argument("--encoder", required=True, help="encoder: advface .safetensors, .onnx, or .pth with --encoder-arch")
    p.add_argument("--encoder-arch", help="architecture of a plain state-dict encoder, e.g. iresnet50")
    p.add_argument("--output", required=True, help="decoder checkpoint (.safetensors)")
    add_renamed(p, "--shadow-arch", "--arch", default="dcgan", metavar="FAMILY",
                help="decoder family: dcgan, nbnet or upconv (default dcgan)")
    p.add_argument("--width", type=positive_int, default=16, help="decoder channel width (default 16)")
    p.add_argument("--size", type=positive_int, help="image size (default: the encoder's input size)")
    p.add_argument("--no-normalize", action="store_true", help="train on raw, not unit-norm, features")
    p.add_argument("--identity-weight", type=float, default=0.0,
                   help="add W * (1 - cos(E(S(z)), z)) to Eq. 1 so the anchor E(S(z)) stays near z "
                        "(default 0: Eq. 1 alone; docs/evaluation.md has what it measured)")
    add_image_args(p)
    add_train_args(p, epochs=8, lr=2e-3, batch_size=64)
    p.set_defaults(func=cmd_train_shadow)

    add_demo_parser(sub)

    p = sub.add_parser("check-kernels", help="compile the fused kernels for CUDA GPUs and check them (no GPU needed)")
    add_kernel_check_args(p)
    p.set_defaults(func=cmd_check_kernels)
