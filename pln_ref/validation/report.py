"""The validation report: figures (PNG, matplotlib on the Agg backend, imported on first use)
and the Markdown report ``report.md`` + ``metrics.json`` written from the metrics of the runs
(:mod:`pln_ref.validation.runs`, :mod:`pln_ref.validation.sbc_runs`)."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import numpy as np

from ..io import atomic_write_json, atomic_write_text

__all__ = [
    "write_report",
    "save_figure",
    "cell_method_figure",
    "khat_figure",
    "joint_sigma_figure",
    "sbc_figures",
]


# --------------------------------------------------------------------------- figures

def _pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> str:
    """Save ``fig`` as a PNG at ``path``, close it and return the file name (for the report)."""
    plt = _pyplot()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path.name


def cell_method_figure(name: str, cmp: dict, out: Path) -> str:
    """Posterior means of x and eta vs NUTS and the SD-ratio histogram of x, one PNG."""
    from .compare import plot_means, plot_sd_ratio_hist

    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    plot_means(cmp["x"], ax=axes[0], title=f"{name}: x means")
    if "eta" in cmp:
        plot_means(cmp["eta"], ax=axes[1], title=f"{name}: eta means")
    plot_sd_ratio_hist(cmp["x"], ax=axes[2], title=f"{name}: SD ratio of x")
    return save_figure(fig, out / f"cell_{name}_means_sdratio.png")


def khat_figure(name: str, khat: np.ndarray, lib: np.ndarray, out: Path) -> str:
    """PSIS k-hat per cell, cells sorted by library size."""
    from .compare import plot_khat

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    plot_khat(np.asarray(khat)[np.argsort(lib)], ax=ax,
              title=f"{name}: PSIS k-hat by cell (sorted by library size)")
    return save_figure(fig, out / f"cell_{name}_khat.png")


def joint_sigma_figure(sigma_draws: np.ndarray, sigma_laplace: np.ndarray, gate_passed: bool, path: Path) -> str:
    """Laplace Sigma entries against the NUTS median and 90% interval; ``sigma_draws`` (S, Q) and
    ``sigma_laplace`` (Q,) are the upper triangles. Red with a warning title if the gate failed."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 5))
    lo, hi = np.quantile(sigma_draws, [0.05, 0.95], axis=0)
    med = np.median(sigma_draws, axis=0)
    ax.errorbar(med, sigma_laplace, xerr=[med - lo, hi - med], fmt="o", ms=3, lw=0.6,
                color="C0" if gate_passed else "C3")
    m0, m1 = min(lo.min(), sigma_laplace.min()), max(hi.max(), sigma_laplace.max())
    ax.plot([m0, m1], [m0, m1], "k--", lw=0.8)
    ax.set_xlabel("NUTS Sigma (median, 90% interval)")
    ax.set_ylabel("Laplace Sigma")
    ax.set_title("joint: Sigma entries" + ("" if gate_passed else " [gate FAILED]"))
    return save_figure(fig, path)


def sbc_figures(ranks: dict[str, np.ndarray], L: int, alpha: float, out: Path, title: str) -> list[str]:
    """Rank histograms and ECDF-difference plots of an SBC run."""
    from .sbc_plots import plot_ecdf_diff, plot_rank_hist

    _pyplot()
    return [save_figure(plot_rank_hist(ranks, L), out / f"{title}_rank_hist.png"),
            save_figure(plot_ecdf_diff(ranks, L, alpha), out / f"{title}_ecdf_diff.png")]


# --------------------------------------------------------------------------- Markdown

def _fmt(v, nd=3):
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def _cell_section(m: dict) -> list[str]:
    s = ["## Per-cell posterior: methods vs NUTS (`pln_cell`)", ""]
    d = m["design"]
    s.append(f"Simulated G={d['G']}, k={d['k']}, {d['n_cells']} cells, library sizes "
             f"{d['library_range'][0]:.0f}-{d['library_range'][1]:.0f} (exogenous anchor), total counts "
             f"{d['total_count_quantiles'][0]:.0f}/{d['total_count_quantiles'][1]:.0f}/"
             f"{d['total_count_quantiles'][2]:.0f} (min/median/max), {100 * d['zero_fraction']:.1f}% zeros.")
    n = m["nuts"]
    s.append(f"NUTS ground truth: one gated fit per cell ({d['nuts']['chains']} chains x {d['nuts']['draws']} "
             f"draws, dense metric); {n['cells_passed']}/{d['n_cells']} cells passed the gate "
             f"({n['refits']} needed a refit), {n['seconds']:.0f} s.")
    if n["cells_failed"]:
        s.append("Cells failing the gate (excluded, never compared): "
                 + "; ".join(f"cell {f['cell']}: {', '.join(f['reasons'])}" for f in n["cells_failed"]))
    s += ["", "| method | median abs std. mean error x [<0.05] | SD ratio x min-max (p05-p95) [0.9-1.1] | "
          "90% coverage x mean (min-max) [0.88-0.92] | 50% coverage x mean | W1/sd median (worst) | "
          "eta median abs std. err | eta SD ratio min-max | k-hat<0.5 | k-hat<0.7 [>=99%] | seconds |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in m["methods"].items():
        if "skipped" in r:
            s.append(f"| {name} | skipped: {r['skipped']} |")
            continue
        x, e, p = r["x"], r.get("eta"), r.get("psis", {})
        s.append(
            f"| {name}{' (FORCED)' if x['forced'] else ''} | {x['std_mean_error']['median_abs']:.3f} | "
            f"{x['sd_ratio']['min']:.3f}-{x['sd_ratio']['max']:.3f} ({x['sd_ratio']['p05']:.3f}-{x['sd_ratio']['p95']:.3f}) | "
            f"{x['cover90']['mean']:.3f} ({x['cover90']['min']:.3f}-{x['cover90']['max']:.3f}) | "
            f"{x['cover50']['mean']:.3f} | {x['w1_scaled']['median']:.3f} ({x['w1_scaled']['worst']:.3f}) | "
            f"{e['std_mean_error']['median_abs']:.3f} | {e['sd_ratio']['min']:.3f}-{e['sd_ratio']['max']:.3f} | "
            f"{_fmt(p.get('share_khat_lt_0.5'))} | {_fmt(p.get('share_khat_lt_0.7'))} | {r['seconds']:.1f} |"
            if e else f"| {name} | {x['std_mean_error']['median_abs']:.3f} | ... |")
    for name, r in m["methods"].items():
        if "psis_reweighted_x" in r:
            w = r["psis_reweighted_x"]
            s.append(f"\nPSIS-reweighted {name}: median |std. mean error| {w['median_abs_std_mean_error']:.3f} "
                     f"(worst {w['worst_abs_std_mean_error']:.3f}), SD ratio {w['sd_ratio_min']:.3f}-{w['sd_ratio_max']:.3f}.")
        if "psis_reweighted_eta" in r:
            w = r["psis_reweighted_eta"]
            s.append(f"PSIS-reweighted {name} eta: median |std. mean error| {w['median_abs_std_mean_error']:.3f} "
                     f"(worst {w['worst_abs_std_mean_error']:.3f}), SD ratio {w['sd_ratio_min']:.3f}-{w['sd_ratio_max']:.3f}; "
                     f"mean signed eta error before reweighting {_fmt(r.get('eta_std_mean_error_mean'))}.")
        if "x_by_library_tercile" in r:
            s.append(f"\n{name} by library-size tercile (x): " + "; ".join(
                f"L {t['library_range'][0]:.0f}-{t['library_range'][1]:.0f}: median |z| "
                f"{t['std_mean_error']['median_abs']:.3f}, SD ratio {t['sd_ratio']['min']:.2f}-{t['sd_ratio']['max']:.2f}, "
                f"cov90 {t['cover90']['mean']:.3f}" for t in r["x_by_library_tercile"]))
        if "corr_x_eta_by_library_tercile" in r:
            s.append(f"\n{name}: posterior corr(x_g, eta), median over cells and genes, NUTS vs {name}: " + "; ".join(
                f"L {t['library_range'][0]:.0f}-{t['library_range'][1]:.0f}: {t['nuts_median']:.2f} vs "
                f"{t['method_median']:.2f}" for t in r["corr_x_eta_by_library_tercile"]))
    s += [""] + [f"![{f}]({f})" for f in m.get("figures", [])] + [""]
    return s


def _family_wise_line(r: dict) -> str:
    """The family-wise (Holm) verdict of an SBC result, one clause per family."""
    fw = r.get("family_wise")
    if not fw:
        return ""
    lab = {"draws": "posterior draws", "psis": "PSIS-reweighted draws"}
    return "Family-wise verdict (Holm over the quantities of each family, level {:.2f}): ".format(r["alpha"]) + "; ".join(
        f"{lab.get(f, f)} {'PASS' if v['passed'] else 'FAIL'} ({v['m']} quantities, smallest Holm-adjusted "
        f"p {v['min_adjusted_p']:.3g}" + (f", rejected: {', '.join(v['rejected'])}" if v["rejected"] else "") + ")"
        for f, v in fw.items()) + "."


def _sbc_section(title: str, r: dict) -> list[str]:
    s = [f"## {title}", "",
         f"{r['n_sims']} simulations, L={r['L']} draws per rank. " + _family_wise_line(r),
         f"Per quantity (each its own simultaneous {100 * (1 - r['alpha']):.0f}% ECDF band, not a decision "
         f"about the posterior): {r['n_quantities'] - r['n_failed']}/{r['n_quantities']} pass "
         f"(expected false failures under calibration: {r['expected_false_failures']:.1f}); "
         f"outside their band: {', '.join(r['failed']) or 'none'}."
         + (f" **Caveat: {r['power_caveat']}.**" if r.get("power_caveat") else ""), ""]
    for k in ("gate_pass_share", "ess_ok_share", "divergent_share", "seconds_per_sim", "converged"):
        if k in r:
            s.append(f"- {k}: {_fmt(r[k])}")
    if "program_versions" in r:
        s.append(f"- pln_joint program versions (hash of code without comments): {', '.join(r['program_versions'])}")
    if "psis_khat" in r:
        kh = r["psis_khat"]
        s.append(f"- PSIS k-hat of the Laplace draws: median {kh['median']:.2f}, worst {kh['worst']:.2f}, "
                 f"share < 0.5 {kh['share_lt_0.5']:.3f}, share < 0.7 {kh['share_lt_0.7']:.3f}")
        for name, lab in (("laplace", "Laplace draws"), ("psis", "PSIS-reweighted (resampled) draws")):
            s.append(f"- {lab}: failed {', '.join(r[f'{name}_failed']) or 'none'} "
                     f"of {r[f'{name}_n_quantities']}")
    s += ["", "| quantity | in own band | p-value | Holm-adjusted p | p-value 1st / 2nd half of sims | max abs ECDF diff |",
          "|---|---|---|---|---|---|"]
    for row in r["table"]:
        ph = row.get("p_value_halves")
        ph_txt = f"{ph[0]:.3f} / {ph[1]:.3f}" if ph else "-"
        holm_txt = (f"{row['p_holm']:.4f}" + (" **rejected**" if row["rejected_holm"] else "")) if "p_holm" in row else "-"
        s.append(f"| {row['quantity']} | {'yes' if row['passed'] else 'NO'} | {row['p_value']:.4f} | "
                 f"{holm_txt} | {ph_txt} | {row['max_abs_ecdf_diff']:.3f} |")
    s += [""] + [f"![{f}]({f})" for f in r["figures"]] + [""]
    return s


def _headline(metrics: dict) -> list[str]:
    """Figures vs goals (issue 5) in one table."""
    rows = []

    def add(name, value, goal, ok):
        rows.append(f"| {name} | {value} | {goal} | {'yes' if ok else 'NO'} |")

    c = metrics.get("cell", {}).get("methods", {})
    for name, r in c.items():
        if "x" not in r:
            continue
        x, p = r["x"], r.get("psis", {})
        add(f"{name}: median abs std. mean error (x)", f"{x['std_mean_error']['median_abs']:.3f}", "< 0.05",
            x["std_mean_error"]["median_abs"] < 0.05)
        add(f"{name}: SD ratio range (x)", f"{x['sd_ratio']['min']:.3f}-{x['sd_ratio']['max']:.3f}", "0.9-1.1",
            x["sd_ratio"]["min"] >= 0.9 and x["sd_ratio"]["max"] <= 1.1)
        add(f"{name}: 90% coverage (x) mean (range)",
            f"{x['cover90']['mean']:.3f} ({x['cover90']['min']:.3f}-{x['cover90']['max']:.3f})", "0.88-0.92",
            0.88 <= x["cover90"]["mean"] <= 0.92)
        if "share_khat_lt_0.7" in p:
            add(f"{name}: share of cells k-hat < 0.7", f"{100 * p['share_khat_lt_0.7']:.1f}%", ">= 99%",
                p["share_khat_lt_0.7"] >= 0.99)
        for q in ("x", "eta"):
            if q in r and "sd_ratio_share_0.9_1.1" in r[q]:
                sh = r[q]["sd_ratio_share_0.9_1.1"]
                add(f"{name}: share of SD ratios ({q}) in 0.9-1.1", f"{100 * sh:.1f}%", ">= 90%", sh >= 0.9)
        if "eta" in r:
            add(f"{name}: median abs std. mean error (eta)", f"{r['eta']['std_mean_error']['median_abs']:.3f}",
                "< 0.05", r["eta"]["std_mean_error"]["median_abs"] < 0.05)
            e = r["eta"]
            add(f"{name}: SD ratio range (eta)", f"{e['sd_ratio']['min']:.3f}-{e['sd_ratio']['max']:.3f}",
                "0.9-1.1", e["sd_ratio"]["min"] >= 0.9 and e["sd_ratio"]["max"] <= 1.1)
        if "corr_x_eta_by_library_tercile" in r:
            t = r["corr_x_eta_by_library_tercile"]
            dev = max(abs(v["method_median"] - v["nuts_median"]) for v in t)
            add(f"{name}: corr(x_g, eta) by library tercile, method vs NUTS",
                " / ".join(f"{v['method_median']:.2f} vs {v['nuts_median']:.2f}" for v in t), "within 0.1",
                dev <= 0.1)
    for jkey in sorted(k for k in metrics if k.startswith("joint")):
        j = metrics[jkey]
        add(f"[{jkey}] joint NUTS gate (N=%d, G=%d, k=%d)" % (j["design"]["N"], j["design"]["G"], j["design"]["k"]),
            "passed" if j["gate"]["passed"] else "failed: " + "; ".join(j["gate"]["reasons"]), "pass",
            j["gate"]["passed"])
        if "laplace_sigma_coverage90" in j:
            add(f"[{jkey}] Laplace Sigma entries in NUTS 90% interval", f"{100 * j['laplace_sigma_coverage90']:.0f}%",
                ">= 90%", j["laplace_sigma_coverage90"] >= 0.9)
    m = metrics.get("moments")
    if m:
        add("moment identities worst abs z", f"{m['worst_abs_z']:.2f}", "< 4.5", m["worst_abs_z"] < 4.5)
    e = metrics.get("engine_agreement")
    if e:
        if "skipped" in e:
            add("engine agreement worst abs z", "skipped", "<= 4", False)
        else:
            add("engine agreement worst abs z", f"{e['worst_abs_z']:.2f}", "<= 4", e["worst_abs_z"] <= 4)
    for key, label in (("sbc_joint", "joint NUTS SBC"), ("sbc_laplace", "Laplace conditional SBC")):
        r = metrics.get(key)
        if r:
            add(f"{label}: simulations", str(r["n_sims"]), ">= 200" if key == "sbc_joint" else ">= 2000",
                r["n_sims"] >= (200 if key == "sbc_joint" else 2000))
            fw = r.get("family_wise")
            if fw:  # the family-wise (Holm) decision, per family of quantities (sbc_stats.sbc_verdict)
                for fam, lab in (("draws", "posterior draws"), ("psis", "PSIS-reweighted draws")):
                    if fam in fw:
                        v = fw[fam]
                        add(f"{label}, {lab}: family-wise (Holm) verdict over {v['m']} quantities",
                            f"{'pass' if v['passed'] else 'FAIL'} (smallest adjusted p {v['min_adjusted_p']:.3g}"
                            + (f"; rejected: {', '.join(v['rejected'])}" if v["rejected"] else "") + ")",
                            "pass at 0.05", v["passed"])
            elif "psis_n_quantities" in r:  # results stored before the family-wise verdict existed
                for name, lab in (("laplace", "Laplace draws"), ("psis", "PSIS-reweighted draws")):
                    n, f = r[f"{name}_n_quantities"], r[f"{name}_failed"]
                    add(f"{label}, {lab}: quantities passing the ECDF test",
                        f"{n - len(f)}/{n} (failed: {', '.join(f) or 'none'})", "all", not f)
            else:
                add(f"{label}: quantities passing the ECDF test",
                    f"{r['n_quantities'] - r['n_failed']}/{r['n_quantities']} (failed: {', '.join(r['failed']) or 'none'})",
                    "all", r["n_failed"] == 0)
    if not rows:
        return []
    return ["## Figures vs goals", "", "| figure | measured | goal | met |", "|---|---|---|---|", *rows, ""]


def _joint_section(jkey: str, j: dict) -> list[str]:
    g = j["gate"]
    lines = [f"## Joint NUTS (`pln_joint`) [{jkey}]", "",
             f"Design: anchors {'library sizes %s' % j['design'].get('lib_range') if j['design'].get('lib_range') else 'capture efficiencies 5-50%'}, "
             f"mean log-rate {j['design'].get('mean_log_rate')}, mean eta {_fmt(j['design'].get('eta_mean'), 2)}.",
             f"N={j['design']['N']}, G={j['design']['G']}, k={j['design']['k']}, mean count "
             f"{j['design']['mean_count']:.1f}, {100 * j['design']['zero_fraction']:.0f}% zeros; "
             f"{j['design']['chains']} chains x {j['design']['warmup']}/{j['design']['draws']}, "
             f"adapt_delta {j['design']['adapt_delta']}, dense metric {j['design']['dense_metric']}"
             + (f", engine {j['design']['engine']} {j['design'].get('engine_version')}" if j['design'].get('engine') else "")
             + f": {j['nuts_seconds']:.0f} s.",
             f"Gate on mu, d, Sigma, x, eta: **{'PASSED' if g['passed'] else 'FAILED'}** (R-hat max "
             f"{_fmt(g['rhat_max'], 4)}, bulk ESS min {_fmt(g['ess_bulk_min'], 0)}, tail ESS min "
             f"{_fmt(g['ess_tail_min'], 0)}, divergences {g['divergences']}, E-BFMI min "
             f"{_fmt(min(g['bfmi']) if g['bfmi'] else None, 2)}).", ""]
    lines += [f"- {r}" for r in g["reasons"]]
    for key in ("laplace_sigma_coverage90", "laplace_sigma_entries_covered",
                "laplace_sigma_coverage90_FORCED_gate_failed", "true_sigma_coverage90"):
        if key in j:
            lines.append(f"- {key}: {_fmt(j[key])}")
    return lines + [""] + [f"![{f}]({f})" for f in j.get("figures", [])] + [""]


def _moments_section(m: dict) -> list[str]:
    lines = ["## Moment identities", "",
             f"Monte Carlo of the simulator, {m['design']['n_cells']} cells, G={m['design']['G']}, "
             f"k={m['design']['k']}: worst |z| over every gene mean, variance and pair covariance = "
             f"**{m['worst_abs_z']:.2f}** [< 4.5] (no capture {m['no_capture']['max_abs_z']:.2f}, "
             f"{m['no_capture']['n_tests']} tests; capture {m['capture']['max_abs_z']:.2f}: "
             f"{m['capture']['worst']}). {m['seconds']:.0f} s.", ""]
    if "fitted_model" in m:
        f = m["fitted_model"]
        lines += [f"Against a Laplace-fitted model ({f['n_cells']} cells, in-sample plug-in posterior predictive "
                  f"moments): worst |z| {f['max_abs_z']:.2f} ({f['worst']}); mean {f['max_abs_z_mean']:.2f}, "
                  f"variance {f['max_abs_z_var']:.2f}, covariance {f['max_abs_z_cov']:.2f}.", ""]
    return lines


def _engines_section(e: dict) -> list[str]:
    names = e.get("engines") or ["stanli", "PyStan"]  # reports written before the choice of engines
    lines = [f"## Engine agreement ({' vs '.join(names)})", ""]
    if "skipped" in e:
        return lines + [f"Skipped: {e['skipped']}", ""]
    versions = e.get("engine_versions") or {}
    lines += [
        f"Worst |z| over {e['n_quantities']} posterior means: **{e['worst_abs_z']:.2f}** [<= 4]; "
        "NUTS wall time " + ", ".join(f"{k} {v:.1f} s" for k, v in e["seconds"].items())
        + "; gates " + ", ".join(f"{k} {'passed' if g['passed'] else 'FAILED'}" for k, g in e["gates"].items())
        + ".", ""]
    if versions:
        lines += ["| engine | version | R-hat max | bulk ESS min | tail ESS min | divergences | E-BFMI min | wall s |",
                  "|---|---|---|---|---|---|---|---|"]
        for k, g in e["gates"].items():
            bfmi = g.get("bfmi")
            bfmi_min = min(bfmi) if isinstance(bfmi, list) and bfmi else bfmi
            lines.append(f"| {k} | {versions.get(k)} | {g.get('rhat_max', float('nan')):.4f} | "
                         f"{g.get('ess_bulk_min', float('nan')):.0f} | {g.get('ess_tail_min', float('nan')):.0f} | "
                         f"{g.get('divergences')} | {bfmi_min if bfmi_min is None else f'{bfmi_min:.2f}'} | "
                         f"{e['seconds'][k]:.1f} |")
        lines.append("")
    return lines


def write_report(out_dir, metrics: dict) -> Path:
    """report.md + metrics.json from the sections present in ``metrics``."""
    out = Path(out_dir)
    lines = ["# pln-ref validation report", "",
             f"Generated {time.strftime('%Y-%m-%d %H:%M:%S')} on {platform.node()} "
             f"({os.cpu_count()} CPUs, Python {platform.python_version()}).", ""]
    lines += _headline(metrics)
    if "cell" in metrics:
        lines += _cell_section(metrics["cell"])
    for jkey in sorted(k for k in metrics if k.startswith("joint")):
        lines += _joint_section(jkey, metrics[jkey])
    if "moments" in metrics:
        lines += _moments_section(metrics["moments"])
    if "engine_agreement" in metrics:
        lines += _engines_section(metrics["engine_agreement"])
    if "sbc_laplace" in metrics:
        lines += _sbc_section("SBC: Laplace conditional posterior", metrics["sbc_laplace"])
    if "sbc_joint" in metrics:
        lines += _sbc_section("SBC: joint NUTS of pln_joint", metrics["sbc_joint"])
    atomic_write_text(out / "report.md", "\n".join(lines) + "\n")
    atomic_write_json(out / "metrics.json", metrics)
    return out / "report.md"
