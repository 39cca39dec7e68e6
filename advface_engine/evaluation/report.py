"""Write an evaluation's figures: ``results.json``, ``report.md``, PNG image grids and the
privacy/utility plot, every figure labelled with the data it was measured on ("synthetic")."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ..principal import AUTO_SHARE
from .benchmark import METHODS, SHADOW_COPY_SEED
from .grids import save_grid

METHOD_NAMES = {"unprotected": "Unprotected", "random": "Random", "dp": "DP (Laplace)", "advface": "AdvFace"}


def _pct(x: float) -> str:
    return f"{100 * x:.2f}"


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _guard(c) -> str:
    return "none" if c is None else f"{c:g}"


def _group(p: dict) -> tuple:
    """An AdvFace sweep point's settings other than eps and the guard."""
    return p["steps"], p["anchor"], p["objective"], p["shadow_identity_weight"]


def save_curve(path: Path, results: dict) -> None:
    """Offline verification accuracy (with its 95% interval) against cross-family attack success: one AdvFace
    curve over eps per swept guard (at the config's steps, anchor and shadow), the guard curve (over
    min_cosine at the config's eps), one curve per baseline, the other swept AdvFace points as dots, and per
    transfer objective the server's shadow and its ensembles (against their unseen attackers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    label, cfg = results["label"], results["config"]
    clean = results["verification"]["clean"]["accuracy"]
    sweep = results["sweep"]
    home = (cfg["steps"], cfg["anchor"], cfg["objective"], results["settings"]["shadow_identity_weight"])
    advface = [p for p in sweep if p["method"] == "advface"]
    fig, ax = plt.subplots(figsize=(7, 5))

    def draw(points, name, marker, linestyle="-", note=None, **kwargs):
        if not points:
            return
        x = [100 * p["attack_success"] for p in points]
        y = [100 * p["offline"] for p in points]
        loss = [p["offline_loss"] for p in points]
        yerr = [[100 * (q["high"] - q["estimate"]) for q in loss], [100 * (q["estimate"] - q["low"]) for q in loss]]
        ax.errorbar(x, y, yerr=yerr, marker=marker, linestyle=linestyle, label=name, capsize=2, markersize=4, **kwargs)
        if note:
            for p, xi, yi in zip(points, x, y, strict=True):
                ax.annotate(note(p), (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=6)

    for c in dict.fromkeys(p["min_cosine"] for p in advface if _group(p) == home):
        draw([p for p in advface if _group(p) == home and p["min_cosine"] == c], f"AdvFace, guard {_guard(c)}, "
             f"T={home[0]}", "o", note=lambda p: f"eps {p['eps']:g}")
    guard_curve = sorted((p for p in advface if _group(p) == home and p["eps"] == cfg["eps"]),
                         key=lambda p: 2.0 if p["min_cosine"] is None else p["min_cosine"])
    if len(guard_curve) > 1:
        draw(guard_curve, f"AdvFace over the guard min_cosine (eps {cfg['eps']:g})", "s", linestyle="--",
             color="k", note=lambda p: f"c {_guard(p['min_cosine'])}")
    others = [p for p in advface if _group(p) != home]
    if others:
        ax.scatter([100 * p["attack_success"] for p in others], [100 * p["offline"] for p in others], s=8,
                   color="grey", alpha=0.5, label="AdvFace, other swept steps / anchor / objective / shadow")
    for method, marker in (("random", "v"), ("dp", "^")):
        draw([p for p in sweep if p["method"] == method], f"{METHOD_NAMES[method]}, guard {_guard(cfg['min_cosine'])}",
             marker, linestyle=":")
    for objective in dict.fromkeys(r["objective"] for r in results.get("transfer", ())):
        chain = [r for r in results["transfer"] if r["objective"] == objective and r["unseen_mean"] is not None
                 and r["shadows"][0] == results["settings"]["shadow"]]  # the server's shadow, then its ensembles
        draw([{**r, "attack_success": r["unseen_mean"]} for r in chain],
             f"AdvFace {objective}: 1, 2, 3 shadows (x: their unseen attackers)", "P", linestyle="-.",
             note=lambda r: "+".join(r["shadows"]))
    unprotected = results["identity_inference"]["unprotected"]["cross_family_mean"]["success"]
    ax.plot([100 * unprotected], [100 * clean], marker="*", markersize=12, linestyle="none", color="k",
            label="Unprotected")
    anchor = results["anchor_only"]
    ax.plot([100 * anchor["attack_success"]], [100 * anchor["offline"]], marker="D", linestyle="none", color="grey",
            label="AdvFace anchor only (steps 0)")
    ax.axhline(100 * clean - 0.5, color="grey", linestyle=":", linewidth=1, label="clean - 0.5 point")
    ax.set_xlabel("identity-inference success, cross-family attackers (%)")
    ax.set_ylabel("offline verification accuracy (%), 95% interval")
    ax.set_title(f"Privacy / utility ({label} faces, seeds {results['seeds']})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def interval(figure: dict | float) -> str:
    """An interval in percentage points: "1.23 [0.98, 1.50]"; a bare figure (results of versions whose
    gallery-wide loss had no interval) as "1.23"."""
    if not isinstance(figure, dict):
        return _pct(figure)
    return f"{_pct(figure['estimate'])} [{_pct(figure['low'])}, {_pct(figure['high'])}]"


def _seeds(values: list[float]) -> str:
    return " / ".join(_pct(v) for v in values)


def _kept_out(setting, kept: dict | None) -> str:
    """The directions kept out, for the method line: "16 principal directions of the clean gallery (80.2% of
    its variance, per seed)"; for "auto", the count each seed took."""
    if kept is None:  # results of versions that did not record them
        return f"{setting} principal directions of the clean gallery"
    shares = " / ".join(f"{100 * v:.1f}%" for v in kept["variance_share"])
    if setting != "auto":
        return f"{setting} principal directions of the clean gallery ({shares} of its variance, per seed)"
    counts = " / ".join(str(k) for k in kept["directions"])
    return (f"{counts} principal directions of the clean gallery, per seed (as many as hold "
            f"{100 * AUTO_SHARE:.0f}% of its variance: {shares})")


def _point_cells(p: dict) -> list[str]:
    gallery = p.get("gallery_loss")  # None without identities (a .bin), absent in results of older versions
    return [_pct(p["offline"]), interval(p["offline_loss"]), "-" if gallery is None else interval(gallery),
            _pct(p["online"]), interval(p["attack_interval"])]


def markdown(results: dict, grid_files: dict[str, str], curve_file: str) -> str:
    """The report's Markdown text."""
    s, cfg, label = results["settings"], results["config"], results["label"]
    attackers = results.get("attackers", list(s["families"]))
    cross = results["cross_family_attackers"]
    data, res = results["data"], results["resolution"]
    seeds = results["seeds"]
    weight = f" (weight {cfg['identity_weight']:g})" if cfg["objective"] == "pixel+identity" else ""
    if cfg.get("smoothing"):  # results of versions before smoothing have no such field
        weight += (f", each step's gradient averaged over {cfg['smoothing']} noisy copies "
                   f"(scale {cfg['smoothing_scale']:g})")
    if s.get("keep_out"):  # results of versions before keep_out have no such field
        weight += f", the steps kept out of the top {_kept_out(s['keep_out'], results.get('keep_out'))}"
    lines = [
        f"# AdvFace evaluation ({label} faces)",
        "",
        f"All figures are measured on **{label}** faces (scale `{s['scale']}`: {s['size']}x{s['size']} images, "
        f"feature dim {s['feature_dim']}, encoder {s['encoder_arch']}, "
        f"{'flip-augmented embeddings (--flip)' if s['flip'] else 'embeddings without flip augmentation'}, "
        f"shadow decoder `{s['shadow']}` trained with identity weight {s['shadow_identity_weight']:g}) on "
        f"`{results['device']}`. Protection: eps {cfg['eps']:g}, alpha {cfg['alpha']:g}, steps {cfg['steps']}, "
        f"norm {cfg['norm']}, constraint {cfg['constraint']}, anchor {cfg['anchor']}, objective {cfg['objective']}"
        f"{weight}, guard min_cosine {_guard(cfg['min_cosine'])}.",
        f"Training seeds {seeds} (each trains every model again on its own faces); per seed a gallery of "
        f"{data['gallery images']} images, {data['pairs']} verification pairs in 10 contiguous folds "
        f"({data['pairs total']} over all seeds); the attacker reconstructs the {data['stored features attacked']} "
        f"stored features on the gallery side of the {data.get('attacks', '')} same-person pairs. "
        "Figures are means over the seeds. Intervals: 95% paired bootstrap, "
        f"{data['bootstrap replicates']} resamples of each seed's pairs within their folds (the 10-fold protocol "
        "rerun on each, clean and protected on the same resample; the attacked features are the positive pairs' "
        "and go with them); they cover the sampling of pairs for these trained models, and each seed's own "
        "figure is shown beside them for the spread between trainings.",
        "",
        f"**Resolution**: the AdvFace offline loss is known to +-{res['offline_loss_half_width_points']:.2f} point "
        f"(95% interval half-width, {res['pairs']} pairs over {res['seeds']} seed{'s' * (res['seeds'] > 1)}).",
        "",
    ]
    if res["warning"]:
        lines += [f"> **Warning: this run is too small to support a recommendation**: {res['warning']}.", ""]
    lines += ["## Verification accuracy (%, 10-fold, mean over seeds)", "",
              "Offline: gallery side protected, probe clean. Online: both sides protected. Loss: clean minus "
              "protected accuracy, in points, with its 95% interval; per seed: each seed's offline loss.", ""]
    clean = results["verification"]["clean"]
    rows = [["Unprotected", f"{_pct(clean['accuracy'])} ± {_pct(clean['std'])}", "-",
             f"{_pct(clean['accuracy'])}", "-", _seeds(clean["per_seed"]) + " (accuracy)"]]
    for method in METHODS[1:]:
        v = results["verification"][method]
        rows.append([METHOD_NAMES[method], f"{_pct(v['offline']['accuracy'])} ± {_pct(v['offline']['std'])}",
                     interval(v["offline"]["loss"]), _pct(v["online"]["accuracy"]), interval(v["online"]["loss"]),
                     _seeds(v["offline"]["loss_per_seed"])])
    lines += _table(["method", "offline", "offline loss [95% CI]", "online", "online loss [95% CI]",
                     "offline loss per seed"], rows)
    if "gallery" in clean:
        losses = ", ".join(f"{METHOD_NAMES[m]} {interval(results['verification'][m]['gallery']['loss'])} "
                           f"({_seeds(results['verification'][m]['gallery']['loss_per_seed'])})" for m in METHODS[1:])
        lines += ["", f"Gallery-wide offline loss, every ordered pair of the gallery's images (stored side against "
                      f"clean side, balanced accuracy at the best threshold; clean {_pct(clean['gallery'])}%), far "
                      f"more pairs than the protocol's, mean over seeds [95% CI: the gallery's identities resampled] "
                      f"(each seed's): {losses}."]
    names = {a: f"attacker {a}" + (" (same as shadow)" if a == s["shadow"] else "") for a in attackers}
    names.update({"strong": "stronger attacker", "adaptive": f"adaptive attacker ({s['adaptive_family']})"})
    lines += [
        "",
        "## Identity inference (attack success %, lower is better)",
        "",
        f"Success: the attacker's reconstruction from a stored feature is accepted by the encoder as the same person "
        f"as a different clean image of that identity, at cosine >= the seed's clean threshold (mean over seeds "
        f"{results['threshold']:.4f}; {results['threshold_rule']}). In brackets: against the stored image itself. "
        f"Attackers train on their own identities, disjoint from the gallery; cross-family attackers: "
        f"{', '.join(cross)} (their mean is the headline figure, with its 95% interval).",
    ]
    if "strong" in attackers:
        lines.append("The stronger attacker is a residual upsampling decoder, twice as wide and trained 1.5 times as "
                     "long as the families, of no shadow family (it only ever attacks).")
    if "adaptive" in attackers:
        lines.append(f"The adaptive attacker knows the algorithm and this config: it trains its own `{s['shadow']}` "
                     "shadow on its own faces, protects its own features with it, and trains its "
                     f"`{s['adaptive_family']}` network on (protected feature, image) pairs; it is trained for this "
                     "config only (the sweep's points are not measured against it).")
    lines.append("")
    rows = []
    for method in METHODS:
        a = results["identity_inference"][method]
        mean = a["cross_family_mean"]
        rows.append([METHOD_NAMES[method]] + [f"{_pct(a[n]['success'])} ({_pct(a[n]['success_self'])})"
                                              for n in attackers]
                    + [interval(mean["interval"])])
    lines += _table(["method"] + [names[a] for a in attackers] + ["cross-family mean [95% CI]"], rows)
    lines += [
        "",
        "## Reconstruction quality of the attacker's output",
        "",
        f"L1 on the [-1, 1] pixel scale; PSNR (dB) and SSIM from scikit-image on [0, 1] images; on the first "
        f"{s['quality_rows']} attacked features of each seed, mean over seeds.",
        "",
    ]
    rows = []
    for method in METHODS:
        a = results["identity_inference"][method]
        for n in attackers:
            rows.append([METHOD_NAMES[method], names[n], f"{a[n]['l1']:.3f}", f"{a[n]['psnr']:.2f}",
                         f"{a[n]['ssim']:.3f}"])
    lines += _table(["method", "attacker", "L1", "PSNR", "SSIM"], rows)
    if "transfer" in results:
        lines += transfer_lines(results, attackers, names)
    if "mismatch" in results:
        m = results["mismatch"]
        lines += ["", "## Shadow mismatch", "",
                  f"The shadow is trained on {m['shadow_images']} grey faces of other identities and another render "
                  f"seed, instead of the server's {s['train_identities'] * s['train_per_identity']} colour faces: "
                  f"median cos(E(S(z)), z) {_seeds_plain(m['fit'])} per seed (the main shadow: "
                  f"{_seeds_plain(results['anchor_only']['fit'])}). Loss and success as above.", ""]
        rows = [[f"guard min_cosine {_guard(m['min_cosine'])}"] + _point_cells(m["guard"])] if "guard" in m else []
        rows.append(["no guard"] + _point_cells(m["no_guard"]))
        lines += _table(["mismatched shadow", "offline", "offline loss [95% CI]", "gallery-wide loss [95% CI]",
                         "online", "attack success [95% CI]"], rows)
    lines += ["", "## Privacy / utility sweep", "",
              f"alpha keeps the ratio alpha/eps = {cfg['alpha'] / cfg['eps']:g}; anchor `original` starts at random; "
              "w: the shadow's identity weight; Random and DP at the config's guard. Attack success: the "
              "cross-family mean.", ""]

    def row(p):
        advface = p["method"] == "advface"
        return [METHOD_NAMES[p["method"]], f"{p['eps']:g}", str(p["steps"]) if advface else "-",
                _guard(p["min_cosine"]), p["anchor"] if advface else "-", p["objective"] if advface else "-",
                f"{p['shadow_identity_weight']:g}" if advface else "-"] + _point_cells(p)

    header = ["method", "eps", "steps", "guard", "anchor", "objective", "w", "offline", "offline loss [95% CI]",
              "gallery-wide loss [95% CI]", "online", "attack success [95% CI]"]
    lines += _table(header, [row(p) for p in results["sweep"]])
    anchor = results["anchor_only"]
    start = "z_0 = E(S(z)), Eq. 5" if cfg["anchor"] == "shadow" else "z_0 = z"
    lines += ["", f"The anchor alone (steps 0, {start}, guarded): mean cos(E(S(z)), z) {anchor['cosine']:.3f} before "
              f"the guard; offline {_pct(anchor['offline'])} (loss {interval(anchor['offline_loss'])}), online "
              f"{_pct(anchor['online'])}, attack success {_pct(anchor['attack_success'])}.", "",
              "Pareto front of the AdvFace points (no other point has both a lower offline loss and a lower attack "
              "success):", ""]
    lines += _table(header, [row(p) for p in results["pareto"]])
    rec = results["recommended"]
    lines += ["", f"Recommendation rule: the {rec['rule']}."]
    for key, scope in (("point", "Over the whole sweep"),
                       ("same_anchor", f"With this run's anchor ({cfg['anchor']}), objective ({cfg['objective']}) "
                                       f"and shadow (identity weight {s['shadow_identity_weight']:g}), i.e. by eps, "
                                       "alpha, steps and the guard")):
        best = rec.get(key)
        if best:
            lines.append(f"- {scope}: eps {best['eps']:g}, alpha {best['alpha']:g}, steps {best['steps']}, guard "
                         f"{_guard(best['min_cosine'])}, anchor {best['anchor']}"
                         f"{' (random start)' if best['random_start'] else ''}, objective {best['objective']}, "
                         f"shadow identity weight "
                         f"{best['shadow_identity_weight']:g}: offline loss {interval(best['offline_loss'])} points, "
                         f"attack success {interval(best['attack_interval'])}%.")
        else:
            lines.append(f"- {scope}: no swept AdvFace setting meets the rule.")
    if "config_meets_rule" in rec:
        lines.append(f"- This run's config {'meets' if rec['config_meets_rule'] else 'does not meet'} the rule "
                     f"(offline loss {interval(results['verification']['advface']['offline']['loss'])}).")
    if res["warning"]:
        lines.append("(Not to be relied on: see the warning above.)")
    lines += ["", f"![privacy/utility curve ({label})]({curve_file})", "", "## Image grids", "",
              "Columns: original | reconstruction from the clean feature | from the AdvFace feature | from Random | "
              f"from DP (seed {seeds[0]}).", ""]
    for name, file in grid_files.items():
        lines += [f"{names.get(name, name).capitalize()} ({label} faces):", "", f"![{name}]({file})", ""]
    dp = results["dp"]
    l2 = cfg["norm"] == "l2"
    lines += ["## Notes", "",
              f"- DP baseline: z + Laplace(0, b) per coordinate with b = {'eps/sqrt(2D)' if l2 else 'eps/sqrt(2)'} = "
              f"{dp['laplace_scale']:.4g} (noise RMS {'L2 norm' if l2 else 'per coordinate'} = eps, AdvFace's "
              f"{cfg['norm']} budget); L1 sensitivity of a unit feature 2*sqrt(D) = {dp['sensitivity_l1']:.3g}, "
              f"hence epsilon = {dp['epsilon']:.4g} (before the guard, which reads z).",
              f"- Random baseline: AdvFace's anchor + eps * {'random unit direction' if l2 else 'random sign'}, "
              "guarded and normalised like AdvFace.",
              f"- AdvFace throughput: {results['throughput']['advface features per second']:.0f} features/s "
              f"({results['throughput']['backend']} backend, including the shadow and encoder passes).",
              "- Timings (s, summed over seeds): " + ", ".join(f"{k} {v:g}" for k, v in results["timings"].items()),
              ""]
    return "\n".join(lines)


def transfer_lines(results: dict, attackers: list[str], names: dict) -> list[str]:
    """The transfer matrix: shadow set (one family or an ensemble) and objective x attacker, with the unseen
    attackers' mean and worst, and the offline loss."""
    s, cfg = results["settings"], results["config"]
    unprotected = results["identity_inference"]["unprotected"]
    lines = ["", "## Transferability (AdvFace attack success %, shadow set x attacker)", "",
             f"Each row protects the gallery at this run's config (eps {cfg['eps']:g}, guard "
             f"{_guard(cfg['min_cosine'])}, anchor {cfg['anchor']}) with one shadow or an ensemble (`a+b`: the step "
             f"ascends the sum of the shadows' objectives; anchor of the first, `ensemble_anchor` "
             f"{cfg['ensemble_anchor']}). Unseen: the attackers of no family in the row's shadows (the stronger "
             "attacker always), their mean with its 95% interval and the worst of them. The adaptive attacker was "
             f"trained against this run's config with one `{s['shadow']}` shadow, not against each row.", ""]
    rows = [["unprotected", "-"] + [_pct(unprotected[a]["success"]) for a in attackers] + ["-", "-", "-"]]
    for r in results["transfer"]:
        unseen = interval(r["unseen_interval"]) if r["unseen_interval"] else "-"
        worst = _pct(r["unseen_max"]) if r["unseen_max"] is not None else "-"
        rows.append(["+".join(r["shadows"]), r["objective"]] + [_pct(r["success"][a]) for a in attackers]
                    + [unseen, worst, interval(r["offline_loss"])])
    lines += _table(["shadows", "objective"] + [names[a] for a in attackers]
                    + ["unseen mean [95% CI]", "worst unseen", "offline loss [95% CI]"], rows)
    if any(len(set(r["shadows"])) < len(r["shadows"]) for r in results["transfer"]):
        lines += ["", f"A family named k times is k shadows of it, the same but for their training seeds: seed + 1 + "
                      f"{SHADOW_COPY_SEED} j for the j-th (j = 0: the server's shadow)."]
    own = next((r for r in results["transfer"] if r["shadows"] == [s["shadow"]] and r["objective"] == cfg["objective"]),
               None)
    if own is not None and own["unseen_mean"] is not None:
        lines += ["", f"This run's config protects with one `{s['shadow']}` shadow and the `{cfg['objective']}` "
                      f"objective (row `{s['shadow']}`, {cfg['objective']}: unseen attackers "
                      f"{_pct(own['unseen_mean'])}%), the library's default: an ensemble needs several trained shadows "
                      "and costs the sum of their times; docs/evaluation.md weighs the rows above."]
    return lines


def _seeds_plain(values: list[float]) -> str:
    return " / ".join(f"{v:.3f}" for v in values)


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
        save_grid(out / name, [originals] + [by_method[m] for m in ("unprotected", "advface", "random", "dp")],
                  ["original", "from clean feature", "from AdvFace feature", "from Random", "from DP"])
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
