"""Command-line flags shared by the subcommands: ProtectConfig's, and the types and renamed spellings they use."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from .config import ANCHORS, CONSTRAINTS, ENSEMBLE_ANCHORS, NORMS, OBJECTIVES, ProtectConfig


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


def positive_int(text: str) -> int:
    """An integer >= 1 (a batch size, a count): anything else is a usage error naming the flag."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


class _Renamed(argparse.Action):
    """Stores the value; a spelling other than the first prints a deprecation message (``add_renamed``)."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        self.old = option_strings[1:]

    def __call__(self, parser, namespace, values, option_string=None):
        if option_string in self.old:
            print(f"{parser.prog}: warning: {option_string} is deprecated and will be removed in the next release; "
                  f"use {self.option_strings[0]}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_renamed(parser, new: str, *old: str, **kwargs) -> argparse.Action:
    """Add the flag ``new``, still taking its ``old`` spellings (argparse aliases) for one release, with a
    deprecation message on stderr; the help lists the new spelling only."""
    action = parser.add_argument(new, *old, action=_Renamed, **kwargs)
    action.option_strings = [new]  # registered under every spelling above; shown under the new one
    return action


def add_protect_args(parser: argparse.ArgumentParser) -> None:
    """One flag per ProtectConfig field: --eps --alpha --steps --norm --constraint --anchor --no-normalize
    --[no-]random-start --seed --min-cosine --objective --objective-weight --ensemble-anchor --smoothing
    --smoothing-scale."""
    d = ProtectConfig()
    g = parser.add_argument_group("protection")
    g.add_argument("--eps", type=float, default=d.eps, help=f"perturbation budget (default {d.eps})")
    g.add_argument("--alpha", type=float, default=d.alpha, help=f"step size (default {d.alpha})")
    g.add_argument("--steps", type=int, default=d.steps, help=f"number of steps T (default {d.steps})")
    g.add_argument("--norm", choices=NORMS, default=d.norm,
                   help=f"linf: sign steps in an L-inf ball; l2: normalised steps in an L2 ball (default {d.norm})")
    g.add_argument("--constraint", choices=CONSTRAINTS, default=d.constraint,
                   help=f"ball: project onto the eps-ball around the anchor; per_step: clip each step to eps "
                        f"(default {d.constraint})")
    g.add_argument("--anchor", choices=ANCHORS, default=d.anchor,
                   help=f"start point: shadow, E(S(z)); original, z itself (with --random-start) "
                        f"(default {d.anchor})")
    g.add_argument("--no-normalize", dest="normalize", action="store_false", help="features are not unit-norm")
    g.add_argument("--random-start", action=argparse.BooleanOptionalAction, default=d.random_start,
                   help=f"start at a random point of the ball (default {'on' if d.random_start else 'off'}; "
                        "--no-random-start: at the anchor)")
    g.add_argument("--seed", type=int, default=d.seed, help=f"seed of --random-start (default {d.seed})")
    g.add_argument("--min-cosine", type=min_cosine_arg, default=d.min_cosine, metavar="C",
                   help=f"utility guard: every protected row keeps cos(protected, original) >= C; 'none' turns it "
                        f"off (default {d.min_cosine})")
    g.add_argument("--objective", choices=OBJECTIVES, default=d.objective,
                   help=f"what the steps ascend: the shadow's pixel error, or how far its reconstruction is from "
                        f"the person to the encoder (default {d.objective})")
    g.add_argument("--objective-weight", dest="identity_weight", type=float, default=d.identity_weight,
                   metavar="W", help=f"weight of the identity term of --objective pixel+identity (default "
                                     f"{d.identity_weight}; not train-shadow's --identity-weight, a training term)")
    g.add_argument("--ensemble-anchor", choices=ENSEMBLE_ANCHORS, default=d.ensemble_anchor,
                   help=f"with several --shadow and --anchor shadow: the first shadow's anchor, or the mean of all "
                        f"(default {d.ensemble_anchor})")
    g.add_argument("--smoothing", type=int, default=d.smoothing, metavar="M",
                   help=f"each step's gradient averaged over M noisy copies of the feature (M times the cost; "
                        f"reference backend); 0: the plain gradient (default {d.smoothing})")
    g.add_argument("--smoothing-scale", type=float, default=d.smoothing_scale, metavar="S",
                   help=f"the copies' noise, relative to |z| / sqrt(D) (default {d.smoothing_scale})")


FLAGS = {"identity_weight": "--objective-weight", "normalize": "--no-normalize"}  # where a flag is not the field's name


def check_smoothing_scale(smoothing: int, scale: float) -> None:
    """Refuse --smoothing-scale set (away from its default) without --smoothing: it would silently do nothing."""
    if smoothing == 0 and scale != ProtectConfig.smoothing_scale:
        raise ValueError(f"--smoothing-scale {scale:g} takes effect only with --smoothing M (M >= 1)")


def config_from_args(args: argparse.Namespace) -> ProtectConfig:
    """The ProtectConfig of the flags; a value it refuses is an error naming the flag, not the field."""
    fields = [f.name for f in dataclasses.fields(ProtectConfig)]
    check_smoothing_scale(args.smoothing, args.smoothing_scale)
    try:
        return ProtectConfig(**{name: getattr(args, name) for name in fields})
    except (TypeError, ValueError) as err:  # ProtectConfig's messages begin with the field's name
        field, _, rest = str(err).partition(" ")
        if field not in fields:
            raise ValueError(str(err)) from None
        raise ValueError(f"{FLAGS.get(field, '--' + field.replace('_', '-'))} {rest}") from None
