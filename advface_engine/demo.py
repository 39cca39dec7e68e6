"""``advface demo``: the whole pipeline on built-in synthetic faces, on a CPU, in minutes."""

from __future__ import annotations

import argparse
from dataclasses import dataclass


@dataclass(frozen=True)
class DemoSettings:
    """Small CPU-sized models; the demo's shadow decoder is also the benchmarks' default on CPU."""

    size: int = 32
    feature_dim: int = 128
    encoder_width: int = 16
    shadow_arch: str = "dcgan"
    attacker_arch: str = "upconv"
    decoder_width: int = 16


DEMO = DemoSettings()


def add_demo_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="train on synthetic faces, protect a gallery, print the table")
    p.set_defaults(func=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    raise NotImplementedError
