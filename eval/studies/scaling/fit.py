"""``maskscale sweep fit``: collect a sweep's final losses, fit the scaling laws, report.

Why: a fit over whatever happened to finish is how a scaling claim goes wrong quietly. So the
fit starts from the *planned* grid (``sweep.json``) and gives every point a status (finished,
failed, interrupted, not run, refused at plan time); only finished points with a validation
loss are fitted, the rest are listed in the report, and a budget left with fewer than three
points is reported as not fittable instead of being dropped from the table.

Losses come from each run's ``summary.json`` (final ``val/<split>/loss``) or, with
``--mlflow-experiment``, from MLflow (runs tagged by ``maskscale sweep plan``: sweep, family,
N, sweep.C; without a sweep folder, the runs found there are the grid). The numbers are fitted
by ``laws``; this module writes ``fit.json``, ``report.md``, ``isoflop.png`` and ``scaling.png``
(folders in them relative to the fit folder) and logs them as artifacts of an MLflow run named
``sweep-fit``. Next to every loss stands the unigram baseline of the runs' corpus on the same
validation rows (``baseline``; ``--no-unigram`` skips it), so a point that has learned nothing
but token frequencies is visible as such.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

import numpy as np

from eval.measure.outputs import save_figure_atomic, write_json_atomic, write_text_atomic
from eval.studies.scaling.baseline import mlflow_metrics, report_lines, skipped, sweep_unigram
from eval.studies.scaling.laws import MIN_POINTS, fit_study, to_json
from eval.studies.scaling.run import FAILED_FILE, load_sweep, run_state
from pipeline.configlib import ConfigError

FAMILIES = ("arm", "mdm")


def loss_key(split: str) -> str:
    return f"val/{split}/loss"


def points_from_sweep(sweep: dict, split: str) -> list[dict]:
    """Every planned point with its status and (if finished) its final validation loss."""
    out = []
    for p in sweep["points"]:
        row = {k: p[k] for k in ("name", "family", "size", "N", "C", "run_dir")}
        config = sweep.get("configs", {}).get(p["name"], {})
        row["corpus"] = config.get("corpus") or sweep.get("corpus")
        row["train_split"] = (config.get("data") or {}).get("split")
        run_dir = Path(p["run_dir"])
        state = run_state(p)
        if state == "finished":
            summary = json.loads((run_dir / "summary.json").read_text())
            row["loss"] = (summary.get("val") or {}).get(loss_key(split))
            state = "finished" if row["loss"] is not None else f"finished without {loss_key(split)}"
        elif (run_dir / FAILED_FILE).is_file():
            state = "failed"
        elif state == "pending":
            state = "not run"
        out.append({**row, "status": state})
    for r in sweep.get("refused", []):
        out.append({k: r[k] for k in ("name", "family", "size", "N", "C")}
                   | {"status": f"refused at plan ({r['steps']:.2g} steps)"})  # fmt: skip
    return out


def mlflow_runs(uri: str, experiment: str, sweep: str | None) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise ConfigError(f"MLflow at {uri} has no experiment {experiment!r}")
    query = f"tags.sweep = '{sweep}'" if sweep else ""
    runs = client.search_runs([exp.experiment_id], filter_string=query, max_results=50000)
    return [r for r in runs if "sweep.fit" not in r.data.tags]


def points_from_mlflow(
    runs: list, split: str, planned: list[dict] | None, uri: str | None = None
) -> list[dict]:
    """Points from MLflow runs; with a plan, matched by the sweep.point tag (the newest wins).
    Each keeps its corpus, run_dir and data.split params (for the unigram baseline)."""
    found: dict[str, dict] = {}
    for r in sorted(runs, key=lambda r: r.info.start_time or 0):
        tags = r.data.tags
        if "family" not in tags or "N" not in tags:
            continue
        name = tags.get("sweep.point") or r.info.run_name or r.info.run_id
        c = float(tags.get("sweep.C") or f"{float(tags['C']):.2g}")
        loss = r.data.metrics.get(loss_key(split))
        status = {"FINISHED": "finished", "RUNNING": "running (in MLflow)"}.get(
            r.info.status, r.info.status.lower()
        )
        if status == "finished" and loss is None:
            status = f"finished without {loss_key(split)}"
        params = r.data.params
        found[name] = {"name": name, "family": tags["family"], "size": tags.get("model", "?"),
                       "N": int(tags["N"]), "C": c, "loss": loss, "status": status,
                       "corpus": params.get("corpus"), "run_dir": params.get("run_dir"),
                       "train_split": params.get("data.split"), "run_id": r.info.run_id,
                       "tracking_uri": uri}  # fmt: skip
    if planned is None:
        return list(found.values())
    out = []
    for p in planned:
        got = found.get(p["name"])
        if got is not None and not got["corpus"]:
            got["corpus"] = p.get("corpus")
        refused = p["status"].startswith("refused")
        out.append(
            got or {**p, "loss": None, "status": p["status"] if refused else "not in MLflow"}
        )
    return out


def fittable(points: list[dict]) -> list[dict]:
    return [p for p in points if p["status"] == "finished" and p.get("loss") is not None]


def isoflop_figure(points: list[dict], result: dict, unigram: dict | None = None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    budgets = sorted({p["C"] for p in points})
    colors = plt.cm.viridis(np.linspace(0, 0.9, max(len(budgets), 1)))
    for ax, fam in zip(axes, FAMILIES):
        optima = {o.C: o for o in result["families"][fam]["optima"]}
        for color, c in zip(colors, budgets):
            pts = sorted((p for p in points if p["family"] == fam and p["C"] == c),
                         key=lambda p: p["N"])  # fmt: skip
            if not pts:
                continue
            ax.scatter([p["N"] for p in pts], [p["loss"] for p in pts], color=color,
                       label=f"C={c:.2g}")  # fmt: skip
            o = optima.get(c)
            if o is not None and o.coeffs is not None:
                xs = np.linspace(np.log(pts[0]["N"]), np.log(pts[-1]["N"]), 100) - o.x0
                a, b, c0 = o.coeffs
                ax.plot(np.exp(xs + o.x0), a * xs**2 + b * xs + c0, color=color, lw=1)
            if o is not None and o.fitted and not o.extrapolated:  # beyond the sizes: report only
                err = None
                if o.N_opt_log_std is not None:
                    s = o.N_opt_log_std
                    err = [[o.N_opt * (1 - np.exp(-s))], [o.N_opt * (np.exp(s) - 1)]]
                ax.errorbar([o.N_opt], [o.L_opt], xerr=err, color=color, marker="*", ms=12)
        draw_unigram(ax, unigram, {p["name"] for p in points if p["family"] == fam})
        ax.set_xscale("log")
        ax.set_title(f"{fam.upper()}: IsoFLOP profiles")
        ax.set_xlabel("non-embedding parameters N")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    axes[0].set_ylabel("final validation loss (nats)")
    fig.tight_layout()
    return fig


def draw_unigram(ax, unigram: dict | None, names: set[str]) -> None:
    """A dashed line at each unigram baseline that some of the panel's points are scored on."""
    groups = [g for g in (unigram or {}).get("groups", []) if names & set(g["runs"])]
    for i, g in enumerate(groups):
        label = f"unigram {g['loss']:.3f}" + (
            f" ({len(g['runs'])} runs)" if len(groups) > 1 else ""
        )
        ax.axhline(g["loss"], color="grey", ls="--", lw=1, label=label if i < 4 else None)


def scaling_figure(result: dict):
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_l, ax_n) = plt.subplots(1, 2, figsize=(12, 4.5))
    for fam, color in zip(FAMILIES, ("tab:blue", "tab:red")):
        fit = result["families"][fam]
        env, env_law = fit.get("envelope") or [], fit.get("envelope_law")
        if env:  # the best measured point per budget: hollow markers, dashed law
            env_c = np.array([e["C"] for e in env])
            ax_l.scatter(env_c, [e["loss"] for e in env], facecolors="none", edgecolors=color)
            if env_law is not None:
                label = f"{fam.upper()}: L_env = {env_law.coef:.3g} C^{env_law.exponent:.4f}"
                ax_l.plot(env_c, env_law(env_c), color=color, ls="--", label=label)
        good = [o for o in fit["optima"] if o.fitted and not o.extrapolated]
        if not good:
            continue
        cs = np.array([o.C for o in good])
        ax_l.scatter(cs, [o.L_opt for o in good], color=color)
        ax_n.scatter(cs, [o.N_opt for o in good], color=color)
        # the MDM's law is drawn on to where it reaches the ARM's losses (the compute gap)
        reach = max([g["mdm_C"] for g in result["gap"]], default=0) if fam == "mdm" else 0
        grid = np.geomspace(cs.min(), max(cs.max(), reach), 50)
        for ax, law, sym in ((ax_l, fit["loss_law"], "L"), (ax_n, fit["size_law"], "N")):
            if law is not None:
                label = f"{fam.upper()}: {sym}_opt = {law.coef:.3g} C^{law.exponent:.4f}"
                ax.plot(grid, law(grid), color=color, label=label)
    for ax, ylabel in ((ax_l, "optimal validation loss (nats)"), (ax_n, "optimal N")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("training compute C = 6ND (FLOPs)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, which="both")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    ax_l.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax_l.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%.1f"))
    fig.tight_layout()
    return fig


def _pm(value, std, fmt="{:.4g}") -> str:
    if value is None:
        return "-"
    return fmt.format(value) + ("" if std is None else " ± " + fmt.format(std))


def report_markdown(source: str, points: list[dict], data: dict) -> str:
    lines = [f"# Scaling-law fit: {source}", ""]
    bad = [p for p in points if p["status"] != "finished" or p.get("loss") is None]
    lines += [f"{len(points) - len(bad)} of {len(points)} planned runs finished with a loss."]
    if bad:
        lines += ["", "## Missing or failed runs (not fitted)", "", "| run | status |", "|---|---|"]
        lines += [f"| {p['name']} | {p['status']} |" for p in bad]
    unigram = data.get("unigram") or skipped("", "")
    shown = not unigram.get("skipped")
    extra = " unigram | below unigram |" if shown else ""
    lines += ["", "## Runs", "", "| family | size | N | C | loss |" + extra + " status |",
              "|---|---|---|---|---|" + ("---|---|" if shown else "") + "---|"]  # fmt: skip
    for p in sorted(points, key=lambda p: (p["family"], p["C"], p["N"])):
        loss = "-" if p.get("loss") is None else f"{p['loss']:.4f}"
        cells = ""
        if shown:
            base, margin = p.get("unigram"), p.get("below_unigram")
            cells = (f" {'-' if base is None else f'{base:.4f}'} |"
                     f" {'-' if margin is None else f'{margin:+.4f}'} |")  # fmt: skip
        lines.append(f"| {p['family']} | {p['size']} | {p['N']:,} | {p['C']:.3g} | {loss} |"
                     f"{cells} {p['status']} |")  # fmt: skip
    if shown:
        lines += ["", *report_lines(unigram)]
    lines += ["", "## IsoFLOP optima (parabola in ln N)", "",
              "| family | C | points | N_opt | L_opt | note |", "|---|---|---|---|---|---|"]  # fmt: skip
    for fam, fit in data["families"].items():
        for o in fit["optima"]:
            n_opt = "-"
            if o["N_opt"] is not None:
                s = o["N_opt_log_std"]
                n_opt = f"{o['N_opt']:.4g}" + ("" if s is None else f" (×/÷ {np.exp(s):.3g})")
            note = o["note"] or ("" if o["fitted"] else "not fittable")
            if o["n_points"] < MIN_POINTS:
                note = f"not fittable: {o['n_points']} finished points (< {MIN_POINTS})"
            lines.append(f"| {fam} | {o['C']:.3g} | {o['n_points']} | {n_opt} | "
                         f"{_pm(o['L_opt'], o['L_opt_std'])} | {note} |")  # fmt: skip
    lines += ["", "## Power laws (log-log least squares over fitted, in-range optima)", ""]
    for fam, fit in data["families"].items():
        for key, sym in (("loss_law", "L_opt"), ("size_law", "N_opt")):
            law = fit[key]
            if law is None:
                lines.append(
                    f"- {fam.upper()} {sym}(C): not fittable (< 2 budgets with an optimum)"
                )
            else:
                lines.append(f"- {fam.upper()} {sym}(C) = {law['coef']:.4g} · C^"
                             f"{_pm(law['exponent'], law['exponent_std'])} "
                             f"({law['n_points']} budgets)")  # fmt: skip
    lines += ["", "## Compute gap: MDM compute for the ARM's optimal loss", ""]
    if data["gap"]:
        lines += ["| ARM budget C | ARM L_opt | MDM compute | multiple |", "|---|---|---|---|"]
        lines += [f"| {g['C']:.3g} | {g['arm_L_opt']:.4f} | {g['mdm_C']:.3g} | "
                  f"{g['multiple']:.3g}× |" for g in data["gap"]]  # fmt: skip
        lines += ["", f"Geometric mean multiple: {data['gap_geomean']:.3g}×"]
    else:
        lines.append("Not available: needs ARM optima and an MDM loss power law.")
    for ratio in data["size_ratio"] or []:
        lines.append(f"- N_opt(MDM) / N_opt(ARM) at C={ratio['C']:.3g}: "
                     f"{ratio['mdm_over_arm_N_opt']:.3g}")  # fmt: skip
    lines += envelope_markdown(data)
    lines += ["", "![IsoFLOP profiles](isoflop.png)", "", "![Scaling laws](scaling.png)", ""]
    return "\n".join(lines)


def envelope_markdown(data: dict) -> list[str]:
    """The envelope section: best measured point per budget, its power law and gap."""
    lines = ["", "## Envelope: the best measured size per budget", "",
             "No vertex needed, so it stands when the optimum lies outside the sizes (an upper",
             "bound on L_opt where the best size is at the edge of the grid).", "",
             "| family | C | best N | loss | note |", "|---|---|---|---|---|"]  # fmt: skip
    for fam, fit in data["families"].items():
        for e in fit.get("envelope", []):
            note = "smallest or largest size: the optimum may lie beyond" if e["at_edge"] else ""
            lines.append(f"| {fam} | {e['C']:.3g} | {e['N']:,} | {e['loss']:.4f} | {note} |")
    lines.append("")
    for fam, fit in data["families"].items():
        law = fit.get("envelope_law")
        if law is None:
            lines.append(f"- {fam.upper()} L_env(C): not fittable (< 2 budgets)")
        else:
            lines.append(f"- {fam.upper()} L_env(C) = {law['coef']:.4g} · C^"
                         f"{_pm(law['exponent'], law['exponent_std'])} "
                         f"({law['n_points']} budgets)")  # fmt: skip
    if data.get("envelope_gap"):
        lines += ["", "| ARM budget C | ARM best loss | MDM compute (envelope law) | multiple |",
                  "|---|---|---|---|"]  # fmt: skip
        lines += [f"| {g['C']:.3g} | {g['arm_loss']:.4f} | {g['mdm_C']:.3g} | "
                  f"{g['multiple']:.3g}× |" for g in data["envelope_gap"]]  # fmt: skip
        lines += ["", f"Geometric mean multiple (envelope): {data['envelope_gap_geomean']:.3g}×"]
    return lines


def log_to_mlflow(uri: str, experiment: str, sweep: str, out: Path, data: dict) -> str | None:
    """An MLflow run ``sweep-fit`` holding the fitted numbers and the report files."""
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        exp = client.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
        run = client.create_run(exp_id, run_name="sweep-fit",
                                tags={"sweep": sweep, "sweep.fit": "1"})  # fmt: skip
        rid = run.info.run_id
        for fam, fit in data["families"].items():
            for key in ("loss_law", "size_law"):
                if fit[key] is not None:
                    client.log_metric(rid, f"{fam}_{key}_exponent", fit[key]["exponent"])
                    client.log_metric(rid, f"{fam}_{key}_coef", fit[key]["coef"])
        if data["gap_geomean"] is not None:
            client.log_metric(rid, "compute_gap_geomean", data["gap_geomean"])
        if data.get("envelope_gap_geomean") is not None:
            client.log_metric(rid, "envelope_gap_geomean", data["envelope_gap_geomean"])
        for fam, fit in data["families"].items():
            if fit.get("envelope_law") is not None:
                client.log_metric(rid, f"{fam}_envelope_exponent", fit["envelope_law"]["exponent"])
        for key, value in mlflow_metrics(data["unigram"]).items():
            client.log_metric(rid, key, value)
        for name in ("report.md", "fit.json", "isoflop.png", "scaling.png"):
            client.log_artifact(rid, str(out / name))
        client.set_terminated(rid)
        return rid
    except Exception as e:  # the report on disk is what matters; MLflow is a copy
        warnings.warn(f"could not log the fit to MLflow at {uri}: {e}", RuntimeWarning, 2)
        return None


PATH_KEYS = ("run_dir", "corpus")
"""Keys whose values are folders; written relative to the fit folder (see ``portable``)."""


def portable(data, base: Path):
    """A copy of ``data`` whose absolute ``run_dir``/``corpus`` paths are relative to ``base``.

    fit.json and report.md get committed and shared; relative to the folder they lie in, they
    name no path of the machine that wrote them and still resolve when the sweep folder (and
    the corpus beside it) moves as a whole."""
    if isinstance(data, dict):
        return {
            k: os.path.relpath(v, base.resolve())
            if k in PATH_KEYS and isinstance(v, str) and os.path.isabs(v)
            else portable(v, base)
            for k, v in data.items()
        }
    if isinstance(data, list):
        return [portable(v, base) for v in data]
    return data


def fit_and_report(
    points: list[dict], out: Path, source: str, split: str = "validation", unigram: bool = True
) -> dict:
    """Fit the finished points; write fit.json, report.md and the two plots into ``out``.
    With ``unigram``, every point with a loss is compared with its corpus's unigram baseline
    on the same rows first. Folders in the written files are relative to ``out``."""
    import matplotlib.pyplot as plt

    base = sweep_unigram(points, split) if unigram else skipped(split, "skipped (--no-unigram)")
    good = fittable(points)
    result = fit_study(good)
    data = {"source": source, "points": points, **to_json(result), "unigram": base}
    data, points = portable(data, out), portable(points, out)
    write_json_atomic(out / "fit.json", data)
    for name, fig in (("isoflop.png", isoflop_figure(good, result, base)),
                      ("scaling.png", scaling_figure(result))):  # fmt: skip
        save_figure_atomic(fig, out / name)
        plt.close(fig)
    write_text_atomic(out / "report.md", report_markdown(source, points, data))
    return data


def cmd_fit(args) -> int:
    if not args.sweep and not args.mlflow_experiment:
        raise ConfigError("sweep fit: give a sweep folder or --mlflow-experiment NAME")
    sweep_dir, sweep = load_sweep(args.sweep) if args.sweep else (None, None)
    tracking = (sweep or {}).get("tracking", {})
    uri = args.tracking_uri or tracking.get("uri")
    experiment = args.mlflow_experiment or tracking.get("experiment")
    name = sweep["name"] if sweep else args.mlflow_experiment
    if args.mlflow_experiment:
        if uri is None:
            from trainer.tracking import TrackingConfig, resolve_uri

            uri = resolve_uri(TrackingConfig())
        planned = points_from_sweep(sweep, args.split) if sweep else None
        runs = mlflow_runs(uri, experiment, sweep["name"] if sweep else args.sweep_tag)
        points = points_from_mlflow(runs, args.split, planned, uri)
        source = f"MLflow {uri} experiment {experiment}"
    else:
        points = points_from_sweep(sweep, args.split)
        source = f"sweep {sweep_dir.resolve().name}"
    if not points:
        raise ConfigError(f"no runs found in {sweep_dir or source}")
    out = Path(args.out) if args.out else (sweep_dir or Path(".")) / "fit"
    data = fit_and_report(points, out, source, args.split, not args.no_unigram)
    print((out / "report.md").read_text())
    if not args.no_mlflow and uri and experiment:
        rid = log_to_mlflow(uri, experiment, name, out, data)
        if rid:
            print(f"logged to MLflow run {rid} (sweep-fit) in experiment {experiment}")
    print(f"report: {out / 'report.md'}; numbers: {out / 'fit.json'}", file=sys.stderr)
    return 0
