"""``advface demo``: the whole pipeline on built-in synthetic faces, on a CPU, in a few minutes.

It trains a recognition encoder, the server's shadow decoder and an attacker of another
family (on disjoint identities), protects a gallery, and prints clean vs protected figures.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .progress import format_rate


@dataclass(frozen=True)
class DemoSettings:
    """Small CPU-sized models; the demo's shadow decoder is also the benchmarks' default on CPU."""

    size: int = 32
    feature_dim: int = 128
    encoder_width: int = 16
    shadow_arch: str = "dcgan"
    attacker_arch: str = "upconv"
    decoder_width: int = 16
    identities: int = 400         # server's training identities (encoder and shadow)
    per_identity: int = 10
    gallery_identities: int = 200  # enrolled people, disjoint from both training sets
    epochs: int = 10
    seed: int = 0


DEMO = DemoSettings()


def add_demo_parser(sub: argparse._SubParsersAction) -> None:
    from .config_args import positive_int

    p = sub.add_parser("demo", help="train on synthetic faces, protect a gallery, print clean vs protected")
    p.add_argument("--output", default="advface-demo", help="folder for checkpoints, grid.png, results.json")
    p.add_argument("--identities", type=positive_int, default=DEMO.identities,
                   help=f"synthetic identities the encoder, the shadow and the attacker each train on "
                        f"(default {DEMO.identities})")
    p.add_argument("--gallery-identities", type=positive_int, default=DEMO.gallery_identities,
                   help=f"enrolled identities, four faces each (default {DEMO.gallery_identities})")
    p.add_argument("--epochs", type=positive_int, default=DEMO.epochs,
                   help=f"training epochs of every model (default {DEMO.epochs})")
    p.add_argument("--seed", type=int, default=DEMO.seed, help=f"seed of data and training (default {DEMO.seed})")
    p.add_argument("--no-progress", action="store_true", help="no stage lines or progress bars")
    p.set_defaults(func=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    settings = DemoSettings(identities=args.identities, gallery_identities=args.gallery_identities,
                            epochs=args.epochs, seed=args.seed)
    results = demo(settings, Path(args.output), progress=not args.no_progress)
    print(format_table(results))
    print(f"\nwrote {args.output}/grid.png and {args.output}/results.json (figures on synthetic faces)")
    return 0


def demo(s: DemoSettings, out: Path, progress: bool = True) -> dict:
    """Run the demo; returns every figure (also written to ``out/results.json``)."""
    import advface_engine as afe

    from .data import synthetic_faces
    from .evaluation.attack import identity_inference
    from .evaluation.datasets import pairs_from_labels
    from .evaluation.quality import reconstruction_quality
    from .evaluation.verification import embed, verification_accuracy
    from .train import train_decoder, train_encoder

    torch.manual_seed(s.seed)
    out.mkdir(parents=True, exist_ok=True)
    timings, log = {}, (print if progress else (lambda *a, **k: None))

    def stage(name):
        timings[name] = time.perf_counter()
        log(f"[demo] {name} ...", flush=True)

    def done(name):
        timings[name] = time.perf_counter() - timings[name]

    stage("synthetic faces")
    server_x, server_y = synthetic_faces(s.identities, s.per_identity, s.size, s.seed)
    attacker_x, _ = synthetic_faces(s.identities, s.per_identity, s.size, s.seed, first_identity=100_000)
    gallery_x, gallery_y = synthetic_faces(s.gallery_identities, 4, s.size, s.seed, first_identity=200_000)
    done("synthetic faces")

    stage("train encoder")
    encoder = afe.build_model("mobilefacenet", num_features=s.feature_dim, input_size=s.size, width=s.encoder_width)
    train_encoder(encoder, server_x, server_y, s.epochs, seed=s.seed, output=out / "encoder.safetensors",
                  progress=progress)
    done("train encoder")

    stage("train shadow")
    shadow = afe.build_model(s.shadow_arch, feature_dim=s.feature_dim, size=s.size, width=s.decoder_width)
    train_decoder(shadow, encoder, server_x, s.epochs, seed=s.seed, output=out / "shadow.safetensors",
                  progress=progress)
    done("train shadow")

    stage("train attacker")
    attacker = afe.build_model(s.attacker_arch, feature_dim=s.feature_dim, size=s.size, width=s.decoder_width)
    train_decoder(attacker, encoder, attacker_x, s.epochs, seed=s.seed + 1, progress=progress)
    done("train attacker")

    stage("protect gallery")
    z = embed(encoder, gallery_x)
    protector = afe.Protector(shadow=shadow, encoder=encoder, config=afe.ProtectConfig())
    start = time.perf_counter()
    z_adv = protector(z)
    protect_seconds = time.perf_counter() - start
    stats = protector.stats(z, z_adv).summary()
    fit = protector.check_fit(z)
    done("protect gallery")

    stage("evaluate")
    left, right, issame = pairs_from_labels(gallery_y.numpy(), pairs_per_fold=2 * (s.gallery_identities // 10),
                                            seed=s.seed)
    clean = verification_accuracy(z[left], z[right], issame)
    offline = verification_accuracy(z_adv[left], z[right], issame)  # gallery side protected, probes clean
    other = torch.arange(len(z)).view(-1, 4).roll(1, dims=1).flatten()  # another image of the same person
    attack_clean, recon_clean = identity_inference(attacker, encoder, z, z[other], z, clean["threshold"])
    attack_prot, recon_prot = identity_inference(attacker, encoder, z_adv, z[other], z, clean["threshold"])
    done("evaluate")

    from .evaluation.grids import save_grid

    save_grid(out / "grid.png", [gallery_x[::4][:8], recon_clean[::4][:8], recon_prot[::4][:8]],
              ["original", "from clean feature", "from protected feature"])
    results = {
        "data": "synthetic",
        "settings": asdict(s),
        "config": protector.config.to_dict(),
        "backend": protector.backend_name,
        "threads": torch.get_num_threads(),  # training's sums depend on it: the run repeats at this count
        "verification": {"clean": clean, "protected_offline": offline},
        "attack": {"clean": attack_clean, "protected": attack_prot},
        "reconstruction": {"clean": reconstruction_quality(recon_clean, gallery_x),
                           "protected": reconstruction_quality(recon_prot, gallery_x)},
        "stats": stats,
        "shadow_fit": asdict(fit),
        "embeddings_per_second": len(z) / protect_seconds,
        "seconds": timings,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    return results


def format_table(r: dict) -> str:
    """The demo's clean vs protected table (Markdown)."""
    v, a, q, s = r["verification"], r["attack"], r["reconstruction"], r["stats"]
    c = r["config"]
    lines = [
        f"AdvFace demo on synthetic faces (eps={c['eps']}, alpha={c['alpha']}, steps={c['steps']}, "
        f"min_cosine={c['min_cosine']}, backend {r['backend']})",
        "",
        "| figure | clean | protected |",
        "| --- | --- | --- |",
        f"| verification accuracy, 10-fold, offline (%) | {100 * v['clean']['accuracy']:.2f} | "
        f"{100 * v['protected_offline']['accuracy']:.2f} |",
        f"| attacker identity-inference success (%) | {100 * a['clean']['success']:.1f} | "
        f"{100 * a['protected']['success']:.1f} |",
        f"| attacker reconstruction L1 (lower = better attack) | {q['clean']['l1']:.3f} | {q['protected']['l1']:.3f} |",
        f"| attacker reconstruction PSNR (dB) | {q['clean']['psnr']:.2f} | {q['protected']['psnr']:.2f} |",
        "",
        f"cos(feature, protected feature): min {s['cosine']['min']:.3f}, median {s['cosine']['median']:.3f}; "
        f"shadow fit cos(E(S(z)), z): median {r['shadow_fit']['anchor_cosine']['median']:.3f}; guard held "
        f"{100 * s['guard_active']:.0f}% of rows",
        f"protection speed: {format_rate(r['embeddings_per_second'], 1, 'embeddings')}; stage seconds: "
        + ", ".join(f"{k} {t:.1f}" for k, t in r["seconds"].items()),
    ]
    return "\n".join(lines)
