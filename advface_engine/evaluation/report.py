"""Write an evaluation's figures: ``results.json``, ``report.md``, PNG image grids and the
privacy/utility plot, every figure labelled with the data it was measured on ("synthetic")."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .benchmark import METHODS

METHOD_NAMES = {"unprotected": "Unprotected", "random": "Random", "dp": "DP (Laplace)", "advface": "AdvFace"}


def _pct(x: float) -> str:
    return f"{100 * x:.2f}"


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def save_grid(path: Path, columns: list[Tensor]) -> None:
    """One row per face, one column per tensor (B, 3, H, W) in [-1, 1], as a PNG."""
    from PIL import Image

    rows = torch.cat([torch.cat(list(c.detach().cpu()), dim=1) for c in columns], dim=2)  # (3, B*H, n*W)
    pixels = ((rows.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    image = Image.fromarray(pixels)
    scale = max(1, 96 // columns[0].shape[-1])
    image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    tmp = path.with_name(path.name + ".tmp.png")
    image.save(tmp)
    os.replace(tmp, path)


def save_curve(path: Path, results: dict) -> None:
    """Offline verification accuracy against cross-family attack success over eps: one curve per baseline
    and one AdvFace curve per swept step count T."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    label = results["label"]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    sweep = results["sweep"]
    swept_steps = dict.fromkeys(p["steps"] for p in sweep if p["method"] == "advface")  # in sweep order
    curves = [(f"AdvFace, T={t}", "o", [p for p in sweep if p["method"] == "advface" and p["steps"] == t])
              for t in swept_steps]
    curves += [(METHOD_NAMES[m], marker, [p for p in sweep if p["method"] == m])
               for m, marker in (("random", "s"), ("dp", "^"))]
    for name, marker, points in curves:
        if not points:
            continue
        x = [100 * p["attack_success"] for p in points]
        y = [100 * p["offline"] for p in points]
        ax.plot(x, y, marker=marker, label=name)
        if name.startswith("AdvFace"):
            for p, xi, yi in zip(points, x, y, strict=True):
                ax.annotate(f"eps {p['eps']:g}", (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7)
    clean = results["verification"]["clean"]["accuracy"]
    unprotected = results["identity_inference"]["unprotected"]["cross_family_mean"]["success"]
    ax.plot([100 * unprotected], [100 * clean], marker="*", markersize=12, linestyle="none", color="k",
            label="Unprotected")
    anchor = results["anchor_only"]
    ax.plot([100 * anchor["attack_success"]], [100 * anchor["offline"]], marker="D", linestyle="none", color="grey",
            label="AdvFace anchor only (steps 0)")
    ax.axhline(100 * clean - 0.5, color="grey", linestyle=":", linewidth=1, label="clean - 0.5 point")
    ax.set_xlabel("identity-inference success, cross-family attackers (%)")
    ax.set_ylabel("offline verification accuracy (%)")
    ax.set_title(f"Privacy / utility over eps ({label} faces)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def markdown(results: dict, grid_files: dict[str, str], curve_file: str) -> str:
    """The report's Markdown text."""
    s, cfg, label = results["settings"], results["config"], results["label"]
    families = list(s["families"])
    cross = results["cross_family_attackers"]
    lines = [
        f"# AdvFace evaluation ({label} faces)",
        "",
        f"All figures are measured on **{label}** faces (scale `{s['scale']}`: {s['size']}x{s['size']} images, "
        f"feature dim {s['feature_dim']}, encoder {s['encoder_arch']}, "
        f"{'flip-augmented embeddings (--flip)' if s['flip'] else 'embeddings without flip augmentation'}, "
        f"shadow decoder `{s['shadow']}`) on "
        f"`{results['device']}`. Protection: eps {cfg['eps']:g}, alpha {cfg['alpha']:g}, steps {cfg['steps']}, "
        f"norm {cfg['norm']}, constraint {cfg['constraint']}, anchor {cfg['anchor']}.",
        f"Gallery: {results['data']['gallery images']} images, {results['data']['pairs']} verification pairs in 10 "
        f"contiguous folds; {results['data']['stored features attacked']} stored features attacked.",
        "",
        "## Verification accuracy (%, 10-fold, mean ± std)",
        "",
        "Offline: gallery side protected, probe clean. Online: both sides protected.",
        "",
    ]
    rows = []
    for method in METHODS:
        v = results["verification"][method]
        rows.append([METHOD_NAMES[method]] + [f"{_pct(v[m]['accuracy'])} ± {_pct(v[m]['std'])}"
                                              for m in ("offline", "online")])
    lines += _table(["method", "offline", "online"], rows)
    lines += [
        "",
        "## Identity inference (attack success %, lower is better)",
        "",
        f"Success: the attacker's reconstruction from a stored feature is accepted by the encoder as the same person "
        f"as a different clean image of that identity, at cosine >= {results['threshold']:.4f} "
        f"({results['threshold_rule']}). In brackets: against the stored image itself. Attackers are trained on "
        f"their own identities, disjoint from the gallery; cross-family attackers: {', '.join(cross)}.",
        "",
    ]
    rows = []
    for method in METHODS:
        a = results["identity_inference"][method]
        rows.append([METHOD_NAMES[method]] + [f"{_pct(a[f]['success'])} ({_pct(a[f]['success_self'])})"
                                              for f in families]
                    + [f"{_pct(a['cross_family_mean']['success'])}"])
    lines += _table(["method"] + [f"attacker {f}" + (" (same as shadow)" if f == s["shadow"] else "")
                                  for f in families] + ["cross-family mean"], rows)
    lines += [
        "",
        "## Reconstruction quality of the attacker's output",
        "",
        "L1 on the [-1, 1] pixel scale; PSNR (dB) and SSIM from scikit-image on [0, 1] images.",
        "",
    ]
    rows = []
    for method in METHODS:
        a = results["identity_inference"][method]
        for f in families:
            rows.append([METHOD_NAMES[method], f, f"{a[f]['l1']:.3f}", f"{a[f]['psnr']:.2f}", f"{a[f]['ssim']:.3f}"])
    lines += _table(["method", "attacker", "L1", "PSNR", "SSIM"], rows)
    lines += ["", "## Transferability (AdvFace attack success %, shadow family x attacker family)", ""]
    lines += _table(["shadow \\ attacker"] + families,
                    [[sh] + [_pct(results["transfer"][sh][f]) for f in families] for sh in families])
    lines += ["", "## Privacy / utility over eps", "",
              f"alpha keeps the ratio alpha/eps = {cfg['alpha'] / cfg['eps']:g}; attack success is the "
              "cross-family mean.", ""]
    rows = [[METHOD_NAMES[p["method"]], f"{p['eps']:g}", "-" if p["alpha"] is None else f"{p['alpha']:g}",
             "-" if p["steps"] is None else str(p["steps"]), _pct(p["offline"]), _pct(p["online"]),
             _pct(p["attack_success"])] for p in results["sweep"]]
    lines += _table(["method", "eps", "alpha", "steps", "offline acc", "online acc", "attack success"], rows)
    anchor = results["anchor_only"]
    start = "z_0 = E(S(z)), Eq. 5" if cfg["anchor"] == "shadow" else "z_0 = z"
    near = f"mean cos(z_0, z) {anchor['cosine']:.3f}, " if "cosine" in anchor else ""
    lines += ["", f"The anchor alone (steps 0, {start}): {near}offline {_pct(anchor['offline'])}, online "
              f"{_pct(anchor['online'])}, attack success {_pct(anchor['attack_success'])}.", ""]
    loss = s["max_verification_loss"]
    for key, reference in (("within_clean", "clean features"), ("within_anchor", "the anchor alone")):
        best = results["recommended"][key]
        if best:
            lines.append(f"- Strongest AdvFace setting within {loss:g} point of the offline accuracy of {reference}: "
                         f"eps {best['eps']:g}, alpha {best['alpha']:g}, steps {best['steps']} "
                         f"(offline {_pct(best['offline'])}, online {_pct(best['online'])}, "
                         f"attack success {_pct(best['attack_success'])}).")
        else:
            lines.append(f"- No swept AdvFace setting stays within {loss:g} point of the offline accuracy of "
                         f"{reference}.")
    lines += ["", f"![privacy/utility curve ({label})]({curve_file})", "", "## Image grids", "",
              "Columns: original | reconstruction from the clean feature | from the AdvFace feature | from Random | "
              "from DP.", ""]
    for family, name in grid_files.items():
        lines += [f"Attacker `{family}` ({label} faces):", "", f"![{family}]({name})", ""]
    dp = results["dp"]
    l2 = cfg["norm"] == "l2"
    lines += ["## Notes", "",
              f"- DP baseline: z + Laplace(0, b) per coordinate with b = {'eps/sqrt(2D)' if l2 else 'eps/sqrt(2)'} = "
              f"{dp['laplace_scale']:.4g} (noise RMS {'L2 norm' if l2 else 'per coordinate'} = eps, AdvFace's "
              f"{cfg['norm']} budget); L1 sensitivity of a unit feature 2*sqrt(D) = {dp['sensitivity_l1']:.3g}, "
              f"hence epsilon = {dp['epsilon']:.4g}.",
              f"- Random baseline: AdvFace's anchor + eps * {'random unit direction' if l2 else 'random sign'}, "
              "normalised like AdvFace.",
              f"- AdvFace throughput: {results['throughput']['advface features per second']:.0f} features/s "
              f"({results['throughput']['backend']} backend, including the shadow and encoder passes).",
              "- Timings (s): " + ", ".join(f"{k} {v:g}" for k, v in results["timings"].items()),
              ""]
    return "\n".join(lines)


def write_report(results: dict, output: str | os.PathLike) -> dict[str, Path]:
    """Write results.json, report.md, grid_<attacker>.png and privacy_utility.png under ``output``; grid_*.png
    files this run does not write (an earlier run's other families) are removed."""
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    artifacts = results.get("artifacts", {})
    figures = {k: v for k, v in results.items() if k != "artifacts"}
    files: dict[str, Path] = {}
    grid_files = {}
    originals = artifacts.get("originals")
    for family, by_method in artifacts.get("grids", {}).items():
        name = f"grid_{family}.png"
        save_grid(out / name, [originals] + [by_method[m] for m in ("unprotected", "advface", "random", "dp")])
        grid_files[family] = name
        files[name] = out / name
    for stale in set(out.glob("grid_*.png")) - set(files.values()):  # from an earlier run with other families
        if stale.is_file():
            stale.unlink()
    _atomic_write(out / "results.json", json.dumps(figures, indent=2, default=_json_default).encode())
    files["results.json"] = out / "results.json"
    save_curve(out / "privacy_utility.png", figures)
    files["privacy_utility.png"] = out / "privacy_utility.png"
    _atomic_write(out / "report.md", markdown(figures, grid_files, "privacy_utility.png").encode())
    files["report.md"] = out / "report.md"
    return files


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")
