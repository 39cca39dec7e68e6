"""``advface protect-gallery``: re-protect a stored gallery file (streamed, resumable, optionally on Ray)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..backends import available
from ..config_args import add_protect_args, config_from_args, positive_int, threshold_arg
from ..principal import AUTO_SHARE
from ..progress import format_rate
from ..stats import FIT_ROWS, MIN_ANCHOR_COSINE
from .formats import FORMATS, open_gallery
from .job import BASIS_CHUNK_ROWS, ENGINES, POLICIES, gallery_moments, protect_gallery


def _per_channel(text: str) -> float | list[float]:
    """--encoder-mean / --encoder-std: a number, or three separated by commas (one per channel)."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) not in (1, 3):
        raise argparse.ArgumentTypeError(f"expected a number or three separated by commas, got {text!r}")
    return values[0] if len(values) == 1 else values


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "protect-gallery", aliases=["protect"],
        help="protect a stored gallery (npy, safetensors, Parquet, FAISS) into a new file, resumable",
        description="Replace every embedding of a gallery file by its protected feature. The job is streamed, "
                    "checkpointed per chunk in OUTPUT.job/ and resumed by rerunning the same command.")
    p.add_argument("--input", required=True, help="gallery file (.npy, .safetensors, .parquet, .faiss/.index)")
    p.add_argument("--output", required=True, help="protected gallery file (written when complete)")
    p.add_argument("--shadow", required=True, action="append",
                   help="shadow decoder checkpoint; repeat it for an ensemble of shadows protecting together")
    p.add_argument("--encoder", required=True, help="encoder: advface .safetensors, .onnx, or .pth with --encoder-arch")
    p.add_argument("--encoder-arch", help="architecture of a plain state-dict encoder, e.g. iresnet50")
    p.add_argument("--encoder-channel-order", choices=("rgb", "bgr"), default="rgb",
                   help="an ONNX encoder's input channel order (default rgb)")
    p.add_argument("--encoder-mean", type=_per_channel, default=127.5, metavar="M",
                   help="an ONNX encoder's input is (pixel - M) / S, pixel values 0..255: a number or three "
                        "(one per channel, in the model's order; default 127.5, insightface's ArcFace convention)")
    p.add_argument("--encoder-std", type=_per_channel, default=127.5, metavar="S",
                   help="see --encoder-mean (default 127.5)")
    p.add_argument("--format", choices=FORMATS, help="output format (default: the output's suffix, else the input's)")
    p.add_argument("--batch-size", type=positive_int, default=1024, help="rows per engine call (default 1024)")
    p.add_argument("--chunk-rows", type=positive_int, help="rows per checkpointed chunk (default: ~32 MiB of rows)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default auto)")
    p.add_argument("--backend", choices=available(), default="auto",
                   help="auto, reference, fused, or an installed plugin's (default auto)")
    p.add_argument("--decoder-dtype", choices=("fp32", "bf16", "tf32", "fp16"),
                   help="the shadow decoder's precision (default fp32): bf16 is faster on CPUs with AMX or "
                        "AVX512-BF16 and on GPUs, within bf16's tolerance; tf32 and fp16 on a GPU (fused backend)")
    p.add_argument("--on-bad-rows", choices=POLICIES, default="fail",
                   help="rows with NaN/Inf or all zero: fail (before any work, an error naming them), skip "
                        "(drop), copy (keep unchanged); all three list them in OUTPUT.bad-rows.json")
    p.add_argument("--engine", choices=ENGINES, default="local", help="local process, or Ray Data actors")
    p.add_argument("--workers", type=positive_int, help="Ray actors (default: one per GPU, else per CPU)")
    p.add_argument("--ray-address", help="Ray cluster address (default: start a local Ray)")
    p.add_argument("--embedding-key", help="embedding tensor / column (default: the only 2-D tensor / list column)")
    p.add_argument("--id-key", help="ids tensor / column (default: 'ids' in safetensors, 'id' in Parquet)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output when the job completes")
    p.add_argument("--min-anchor-cosine", type=threshold_arg, default=MIN_ANCHOR_COSINE, metavar="C",
                   help=f"preflight: refuse (exit 2, nothing written) when the median cos(E(S(z)), z) over "
                        f"{FIT_ROWS} rows is below C, i.e. the shadow does not fit this encoder and gallery "
                        f"(default {MIN_ANCHOR_COSINE}; 'none': never refuse)")
    p.add_argument("--force", action="store_true", help="run even when the preflight finds the shadow does not fit")
    p.add_argument("--keep-out", metavar="FILE|auto[:K]",
                   help="a basis file (advface basis): keep the steps out of those principal directions, so the "
                        f"guard costs less accuracy; 'auto': the fewest principal directions of the input's rows "
                        f"that hold {100 * AUTO_SHARE:.0f}%% of their variance ('auto:K': K of them), made by one more "
                        "pass over it and kept for a resume")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar (on a terminal) or progress lines (in a log)")
    add_protect_args(p)
    p.set_defaults(func=run)

    b = sub.add_parser(
        "basis", help="the top principal directions of a gallery's features, for protect-gallery --keep-out",
        description="Read a gallery file (or any features of the same encoder) chunk by chunk and write the top K "
                    "principal directions of its rows (NaN, Inf and zero rows left out) as a basis file.")
    b.add_argument("--input", required=True, help="features file (.npy, .safetensors, .parquet, .faiss/.index)")
    b.add_argument("--output", "-o", required=True, help="basis file to write (.safetensors)")
    b.add_argument("-k", type=positive_int, help=f"principal directions kept out (default: the fewest that hold "
                                                 f"{100 * AUTO_SHARE:.0f}%% of the rows' variance, as --keep-out "
                                                 "auto)")
    b.add_argument("--embedding-key", help="embedding tensor / column (default: the only 2-D tensor / list column)")
    b.add_argument("--chunk-rows", type=positive_int, default=BASIS_CHUNK_ROWS,
                   help=f"rows read at a time (default {BASIS_CHUNK_ROWS}, as protect-gallery --keep-out auto)")
    b.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    b.set_defaults(func=run_basis)


def run_basis(args: argparse.Namespace) -> int:
    from ..principal import save_basis

    gallery = open_gallery(args.input, args.embedding_key, None)
    try:
        moments = gallery_moments(gallery, args.progress, args.chunk_rows)
    finally:
        gallery.close()
    basis = moments.directions(args.k or None)
    save_basis(args.output, basis)
    k = len(basis)
    print(f"wrote {args.output}: the top {k} principal directions of {moments.count} rows of dim {gallery.dim}, "
          f"holding {100 * moments.variance_share(k):.1f}% of their variance")
    return 0


def run(args: argparse.Namespace) -> int:
    import time

    start = time.perf_counter()
    try:
        result = protect_gallery(
            args.input, args.output, args.shadow, args.encoder, config_from_args(args), batch_size=args.batch_size,
            chunk_rows=args.chunk_rows, device=args.device, backend=args.backend, format=args.format,
            on_bad_rows=args.on_bad_rows, engine=args.engine, workers=args.workers, ray_address=args.ray_address,
            embedding_key=args.embedding_key, id_key=args.id_key, encoder_arch=args.encoder_arch,
            encoder_options={"channel_order": args.encoder_channel_order, "mean": args.encoder_mean,
                             "std": args.encoder_std},
            backend_options={"dtype": args.decoder_dtype} if args.decoder_dtype else None,
            overwrite=args.overwrite, progress=args.progress, min_anchor_cosine=args.min_anchor_cosine,
            force=args.force, keep_out=args.keep_out)
    except KeyboardInterrupt:  # Ctrl-C: one line, not a traceback through torch
        work = Path(f"{args.output}.job")
        kept = f"; finished chunks are kept in {work}: rerun the same command to resume" if work.is_dir() else ""
        print(f"\nadvface {args.command}: interrupted{kept}", file=sys.stderr)
        return 130
    elapsed = time.perf_counter() - start
    bad = f", {result.bad_rows} bad rows listed in {result.bad_rows_file}" if result.bad_rows else ""
    rate = "" if result.resumed_chunks else format_rate(result.rows, elapsed, "rows")
    rate = f", {rate}" if rate else ""
    print(f"wrote {result.output} ({result.format}): {result.rows_written} of {result.rows} rows, "
          f"{result.chunks} chunks ({result.resumed_chunks} resumed){bad}, {elapsed:.1f} s{rate}")
    for line in summary_lines(result, anchor=args.anchor):
        print(line)
    return 0


def summary_lines(result, anchor: str = "shadow") -> list[str]:
    """What the job did to the features, for an operator to check: cos(feature, protected feature) over every
    protected row (a gross misconfiguration, another encoder's features, shows as cosines near 0), and the
    preflight's and the sample's figures (the anchor's cosine only where the anchor is E(S(z)): anchored at z
    it is 1)."""
    lines = []
    if result.cosine:
        c = result.cosine
        lines.append(f"cos(feature, protected feature): min {c['min']:.3f}, median {c['median']:.3f}, "
                     f"mean {c['mean']:.3f}, max {c['max']:.3f}")
    stats = result.stats or {}
    if "fit" in stats:
        fit = stats["fit"]
        which = "" if fit.get("shadows", 1) == 1 else f" of the worst of {fit['shadows']}, shadow {fit['shadow'] + 1}"
        lines.append(f"shadow fit (preflight, {fit['rows']} rows): median cos(E(S(z)), z) "
                     f"{fit['anchor_cosine']['median']:.3f}{which}")
        if "keep_out" in fit:
            kept = fit["keep_out"]
            lines.append(f"keep_out basis: its {kept['k']} directions hold {100 * kept['variance_share']:.1f}% of the "
                         f"preflight rows' variance (low: a basis of other features, which protects as without it)")
    if "sample" in stats:
        s = stats["sample"]
        gain = s["l1_gain"]["median"]
        lines.append(f"sample of {s['rows']} protected rows: guard held {100 * s['guard_active']:.0f}%"
                     + (f", anchor cosine median {s['anchor_cosine']['median']:.3f}" if anchor == "shadow" else "")
                     + ("" if gain != gain else f", shadow L1 gain median {gain:.2f}"))  # NaN: no gain to speak of
    return lines
