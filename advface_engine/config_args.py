"""Command-line flags for ProtectConfig, shared by every subcommand that protects features."""

from __future__ import annotations

import argparse
import dataclasses

from .config import ANCHORS, CONSTRAINTS, NORMS, OBJECTIVES, ProtectConfig


def _cosine_or_none(text: str, closed: bool) -> float | None:
    """A cosine from the command line: a number in (-1, 1), or [-1, 1] when ``closed``; "none" is None."""
    if text.strip().lower() in ("none", "off"):
        return None
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (-1 <= value <= 1 if closed else -1 < value < 1):  # NaN fails too
        span = "[-1, 1]" if closed else "(-1, 1)"
        raise argparse.ArgumentTypeError(f"expected a number in {span} or 'none', got {text!r}")
    return value


def min_cosine_arg(text: str) -> float | None:
    """--min-cosine's value: a number in (-1, 1), or "none" (no guard)."""
    return _cosine_or_none(text, closed=False)


def threshold_arg(text: str) -> float | None:
    """A cosine threshold such as --min-anchor-cosine: a number in [-1, 1], or "none" (no threshold)."""
    return _cosine_or_none(text, closed=True)


def add_protect_args(parser: argparse.ArgumentParser) -> None:
    """One flag per ProtectConfig field: --eps --alpha --steps --norm --constraint --anchor --no-normalize
    --random-start --seed --min-cosine --objective --objective-weight."""
    d = ProtectConfig()
    g = parser.add_argument_group("protection")
    g.add_argument("--eps", type=float, default=d.eps, help=f"perturbation budget (default {d.eps})")
    g.add_argument("--alpha", type=float, default=d.alpha, help=f"step size (default {d.alpha})")
    g.add_argument("--steps", type=int, default=d.steps, help=f"number of steps T (default {d.steps})")
    g.add_argument("--norm", choices=NORMS, default=d.norm)
    g.add_argument("--constraint", choices=CONSTRAINTS, default=d.constraint)
    g.add_argument("--anchor", choices=ANCHORS, default=d.anchor)
    g.add_argument("--no-normalize", dest="normalize", action="store_false", help="features are not unit-norm")
    g.add_argument("--random-start", action="store_true")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--min-cosine", type=min_cosine_arg, default=d.min_cosine, metavar="C",
                   help=f"utility guard: every protected row keeps cos(protected, original) >= C; 'none' turns it "
                        f"off (default {d.min_cosine})")
    g.add_argument("--objective", choices=OBJECTIVES, default=d.objective,
                   help=f"what the steps ascend: the shadow's pixel error, or how far its reconstruction is from "
                        f"the person to the encoder (default {d.objective})")
    g.add_argument("--objective-weight", dest="identity_weight", type=float, default=d.identity_weight,
                   metavar="W", help=f"weight of the identity term of --objective pixel+identity (default "
                                     f"{d.identity_weight}; not train-shadow's --identity-weight, a training term)")


def config_from_args(args: argparse.Namespace) -> ProtectConfig:
    return ProtectConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ProtectConfig)})
