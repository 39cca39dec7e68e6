"""``advface eval``: the evaluation from flags or a JSON settings file, written as JSON + Markdown report."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from ..config import ProtectConfig
from ..config_args import add_protect_args, add_renamed, check_smoothing_scale, min_cosine_arg, positive_int
from ..models import DECODERS
from ..principal import AUTO_SHARE

NOT_GIVEN = object()  # a protection flag's default here: None is a value (--min-cosine none), not "not given"


def _parse(text: str, convert, kind: str) -> tuple:
    """Comma-separated values, each through ``convert``; anything else is a usage error naming ``kind``."""
    try:
        values = tuple(convert(v.strip()) for v in text.split(",") if v.strip())
    except ValueError:
        values = ()
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated {kind}, got {text!r}")
    return values


def _floats(text: str) -> tuple[float, ...]:
    return _parse(text, float, "numbers")


def _ints(text: str) -> tuple[int, ...]:
    return _parse(text, int, "integers")


def _names(text: str) -> tuple[str, ...]:
    return _parse(text, str, "names")


def _ensembles(text: str) -> tuple[tuple[str, ...], ...]:
    return _parse(text, lambda v: tuple(f.strip() for f in v.split("+")), "ensembles like dcgan+nbnet")


def _keep_out(text: str) -> int | str:
    """--keep-out: a count of directions, or 'auto' (as many as hold principal.AUTO_SHARE of the variance)."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a count of directions or 'auto', got {text!r}") from None


def _guards(text: str) -> tuple[float | None, ...]:
    def convert(value: str) -> float | None:
        try:
            return min_cosine_arg(value)
        except argparse.ArgumentTypeError:
            raise ValueError from None

    return _parse(text, convert, "numbers in (-1, 1) or 'none'")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="verification, identity-inference attack, baselines and report (synthetic faces)",
                       description="Reproduce the paper's tables on synthetic faces (or a .bin / image folder) and "
                                   "write results.json, report.md, image grids and the privacy/utility plot.")
    p.add_argument("--output", "-o", default="advface-eval", help="output folder (default advface-eval)")
    p.add_argument("--config", help="JSON file of evaluation settings (flags given here override it)")
    p.add_argument("--scale", choices=("tiny", "small", "medium", "large"),
                   help="preset: tiny (seconds), small (default: 32x32, dim 128, minutes on a CPU), medium (small's "
                        "models over 3 seeds and 18,000 pairs: intervals of about half a point, <= 30 min on a CPU), "
                        "large (GPU)")
    p.add_argument("--num-seeds", type=positive_int,
                   help="training seeds (each trains every model again on its own faces)")
    p.add_argument("--shadow-arch", help="shadow decoder family (default dcgan)")
    p.add_argument("--shadow-identity-weight", type=float,
                   help="identity term in the shadows' training (train-shadow --identity-weight; default 0)")
    p.add_argument("--families", type=_names, help="decoder families for attackers and the transfer matrix")
    p.add_argument("--transfer", action=argparse.BooleanOptionalAction, default=None,
                   help="the shadow set x attacker matrix: a shadow of every family and ensembles of them (default: "
                        "on, off at the medium scale)")
    p.add_argument("--ensembles", type=_ensembles, metavar="A+B,...",
                   help="the matrix's ensembles, e.g. dcgan+nbnet,dcgan+nbnet+upconv; a family repeated (dcgan+dcgan) "
                        "is trained again with another seed (default: the shadow's family "
                        "with one, two, ... other families)")
    p.add_argument("--transfer-objectives", type=_names, metavar="NAMES",
                   help="objectives each row of the matrix is protected with (default pixel)")
    p.add_argument("--keep-out", type=_keep_out, metavar="K|auto",
                   help="keep the steps out of the top K principal directions of the clean gallery's features "
                        f"(Protector keep_out); 'auto': as many as hold {100 * AUTO_SHARE:.0f}%% of their variance, "
                        "per seed, as the gallery job's --keep-out auto (default 0: off)")
    p.add_argument("--sweep-eps", type=_floats, help="comma-separated eps values of the privacy/utility curve")
    p.add_argument("--sweep-steps", type=_ints, help="comma-separated step counts swept as well")
    p.add_argument("--sweep-min-cosine", type=_guards, help="comma-separated guards swept as well ('none': no guard)")
    p.add_argument("--sweep-anchor", type=_names, help="comma-separated anchors swept as well (shadow, original)")
    p.add_argument("--sweep-objective", type=_names,
                   help="comma-separated objectives swept as well (pixel, identity, pixel+identity)")
    p.add_argument("--sweep-identity-weight", type=_floats,
                   help="comma-separated identity weights of the shadow swept as well (one shadow trained per weight)")
    p.add_argument("--sweep", metavar="NAME",
                   help="a named sweep grid: 'defaults' (eps, guard, anchor, steps, shadow) or 'objective' (the "
                        "objectives at the guards that keep half a point); sweep flags win")
    p.add_argument("--replicates", type=positive_int, help="bootstrap resamples of every interval (default 1000)")
    p.add_argument("--flip", action="store_true", default=None, help="flip-augmented embeddings")
    p.add_argument("--backend", choices=("auto", "reference", "fused"), help="protection backend (default auto)")
    p.add_argument("--device", help="cpu, cuda or auto (default)")
    p.add_argument("--eval-seed", dest="eval_seed", type=int, help="seed of data, pairs, training and baselines")
    p.add_argument("--bin", help="evaluate on an insightface verification .bin instead of synthetic faces")
    p.add_argument("--folder", help="evaluate on an image folder (one sub-folder per identity)")
    p.add_argument("--pairs", help="pair file for --folder: lines '<image> <image> <1|0>'")
    add_renamed(p, "--encoder", "--encoder-checkpoint", dest="encoder_file", metavar="FILE",
                help="use this encoder file instead of training one (its header sets the feature and image size)")
    add_renamed(p, "--shadow", "--shadow-checkpoint", dest="shadow_file", metavar="FILE",
                help="use this shadow decoder file (of the --shadow-arch family) instead of training one")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_protect_args(p)
    # protection flags override a settings file only when given (NOT_GIVEN: None is --min-cosine none)
    p.set_defaults(func=run_eval, **{f.name: NOT_GIVEN for f in dataclasses.fields(ProtectConfig)})


def settings_from_args(args: argparse.Namespace):
    """EvalSettings from the flags, on top of ``--config`` when given (a flag given wins)."""
    from .benchmark import SWEEPS, load_settings, settings_for

    if args.sweep and args.sweep not in SWEEPS:
        raise ValueError(f"--sweep: unknown sweep {args.sweep!r}; known: {sorted(SWEEPS)}")
    overrides = dict(SWEEPS[args.sweep]) if args.sweep else {}
    flags = {name: getattr(args, name) for name in (
        "shadow_identity_weight", "families", "num_seeds", "sweep_eps", "sweep_steps", "sweep_min_cosine",
        "sweep_anchor", "sweep_objective", "sweep_identity_weight", "replicates", "flip", "backend", "device", "bin",
        "folder", "pairs", "transfer", "ensembles", "transfer_objectives", "keep_out")}
    flags.update(shadow=args.shadow_arch, shadow_checkpoint=args.shadow_file, encoder_checkpoint=args.encoder_file)
    if args.shadow_file in DECODERS and not os.path.exists(args.shadow_file):  # the old spelling --shadow FAMILY
        print(f"advface eval: warning: --shadow {args.shadow_file} (a family) is deprecated and will be removed in "
              f"the next release; use --shadow-arch {args.shadow_file} (--shadow is a shadow decoder file)",
              file=sys.stderr)
        flags.update(shadow=args.shadow_arch or args.shadow_file, shadow_checkpoint=None)
    overrides.update({k: v for k, v in flags.items() if v is not None})
    overrides["seed"] = args.eval_seed
    protect = {f.name: getattr(args, f.name) for f in dataclasses.fields(ProtectConfig)
               if getattr(args, f.name) is not NOT_GIVEN}
    if args.config:
        settings = load_settings(args.config, scale=args.scale, **overrides)
        if protect:
            settings = dataclasses.replace(settings, protect={**settings.protect, **protect})
            settings.config()
        return settings
    return settings_for(args.scale or "small", protect=protect, **overrides)


def run_eval(args: argparse.Namespace) -> int:
    from .benchmark import METHODS, run_evaluation
    from .report import write_report

    settings = settings_from_args(args)
    config = settings.config()
    check_smoothing_scale(config.smoothing, config.smoothing_scale)
    output = Path(args.output)
    if output.exists() and not output.is_dir():
        raise ValueError(f"--output {output} exists and is not a folder")
    output.mkdir(parents=True, exist_ok=True)  # before the run, so a bad path fails in seconds, not after it
    results = run_evaluation(settings, progress=not args.no_progress)
    files = write_report(results, args.output)
    v, a = results["verification"], results["identity_inference"]
    print(f"{results['label']} faces, scale {settings.scale}, seeds {results['seeds']}, "
          f"{results['data']['pairs total']} pairs, {results['timings']['total']:.0f} s")
    for method in METHODS:
        loss = v[method]["offline"].get("loss")
        interval = f" (loss {100 * loss['estimate']:.2f} [{100 * loss['low']:.2f}, {100 * loss['high']:.2f}])" \
            if loss and method != "unprotected" else ""
        print(f"  {method:12s} offline {100 * v[method]['offline']['accuracy']:6.2f}%{interval}  "
              f"online {100 * v[method]['online']['accuracy']:6.2f}%  "
              f"attack success {100 * a[method]['cross_family_mean']['success']:6.2f}%")
    if results["resolution"]["warning"]:
        print(f"  warning: {results['resolution']['warning']}")
    print(f"wrote {files['report.md']} and {files['results.json']}")
    return 0
