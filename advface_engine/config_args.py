"""Command-line flags for ProtectConfig, shared by every subcommand that protects features."""

from __future__ import annotations

import argparse
import dataclasses

from .config import ANCHORS, CONSTRAINTS, NORMS, ProtectConfig


def add_protect_args(parser: argparse.ArgumentParser) -> None:
    """--eps --alpha --steps --norm --constraint --anchor --no-normalize --random-start --seed."""
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


def config_from_args(args: argparse.Namespace) -> ProtectConfig:
    return ProtectConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ProtectConfig)})
