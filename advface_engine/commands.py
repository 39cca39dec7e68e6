"""Core subcommands: train-shadow, protect, demo."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from .demo import add_demo_parser

    add_demo_parser(sub)
