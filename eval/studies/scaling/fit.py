"""``maskscale sweep fit``: collect a sweep's final losses, fit the scaling laws, report.

Why: a fit over whatever happened to finish is how a scaling claim goes wrong quietly. So the
fit starts from the *planned* grid (``sweep.json``) and gives every point a status (finished,
failed, interrupted, not run, refused at plan time); only finished points with a validation
loss are fitted, the rest are listed in the report, and a budget left with fewer than three
points is reported as not fittable instead of being dropped from the table.

Losses come from each run's ``summary.json`` (final ``val/<split>/loss``) or, with
``--mlflow-experiment``, from MLflow (runs tagged by ``maskscale sweep plan``: sweep, family,
N, sweep.C; without a sweep folder, the runs found there are the grid), or from any table of
points (``--points FILE.csv``, ``table``). Each point keeps its nominal budget ``C`` (its
IsoFLOP line) and its realised compute ``C_real`` = 6 N D with D the tokens it actually
trained: ``flops`` of summary.json, else 6 N x the last ``tokens`` metric in MLflow, else the
plan's (or MLflow's resolved) flops, else C; ``C_source`` says which. The numbers are fitted
by ``laws`` (on realised compute) with intervals from ``bootstrap``; this module writes
``fit.json``, ``report.md`` (``report``), ``isoflop.png`` and ``scaling.png`` (``figures``)
(folders in them relative to the fit folder) and logs them as artifacts of an MLflow run named
``sweep-fit``. Next to every loss stands the unigram baseline of the runs' corpus on the same
validation rows (``baseline``; ``--no-unigram`` skips it), so a point that has learned nothing
but token frequencies is visible as such.
"""

from __future__ import annotations

import json
import math
import os
import sys
import warnings
from pathlib import Path

from eval.measure.outputs import save_figure_atomic, write_json_atomic, write_text_atomic
from eval.studies.scaling.baseline import mlflow_metrics, skipped, sweep_unigram
from eval.studies.scaling.bootstrap import DEFAULT_RESAMPLES, DEFAULT_SEED, bootstrap, quantities
from eval.studies.scaling.figures import isoflop_figure, scaling_figure
from eval.studies.scaling.laws import fit_study, to_json
from eval.studies.scaling.report import report_markdown
from eval.studies.scaling.run import FAILED_FILE, load_sweep, run_state
from eval.studies.scaling.table import read_points
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
            row["C_real"], row["C_source"] = realised_compute(p, summary)
        elif (run_dir / FAILED_FILE).is_file():
            state = "failed"
        elif state == "pending":
            state = "not run"
        out.append({**row, "status": state})
    for r in sweep.get("refused", []):
        out.append({k: r[k] for k in ("name", "family", "size", "N", "C")}
                   | {"status": f"refused at plan ({r['steps']:.2g} steps)"})  # fmt: skip
    return out


def realised_compute(planned: dict, summary: dict) -> tuple[float, str]:
    """(C = 6 N D of the tokens the run trained, where it came from): summary.json's
    ``flops``, else the plan's flops (its steps after rounding), else the nominal C."""
    for value, source in ((summary.get("flops"), "summary.json"),
                          (planned.get("flops"), "plan")):  # fmt: skip
        if isinstance(value, int | float) and math.isfinite(value) and value > 0:
            return float(value), source
    return float(planned["C"]), "nominal"


def mlflow_compute(run, n: int, c: float) -> tuple[float, str]:
    """Realised C of an MLflow run: 6 N x its last ``tokens`` metric (the trainer logs it at
    the final step), else its ``resolved.flops`` param (the planned steps), else ``c``."""
    tokens = run.data.metrics.get("tokens")
    if tokens and math.isfinite(tokens) and tokens > 0:
        return 6.0 * n * tokens, "MLflow tokens"
    try:
        flops = float(run.data.params.get("resolved.flops", "nan"))
    except ValueError:
        flops = math.nan
    if math.isfinite(flops) and flops > 0:
        return flops, "MLflow resolved.flops"
    return c, "nominal"


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
        c_real, c_source = mlflow_compute(r, int(tags["N"]), c)
        found[name] = {"name": name, "family": tags["family"], "size": tags.get("model", "?"),
                       "N": int(tags["N"]), "C": c, "loss": loss, "status": status,
                       "C_real": c_real, "C_source": c_source,
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
    """The finished points the fit can take. A finished run with a NaN or infinite loss, a
    family other than arm/mdm, or no positive N and C gets a status saying so and is listed,
    not fitted (``laws.check_points`` would refuse it)."""
    for p in points:
        loss = p.get("loss")
        if p["status"] != "finished" or loss is None:
            continue
        if not math.isfinite(loss):
            p["status"] = f"finished with a non-finite loss ({loss})"
        elif p.get("family") not in FAMILIES:
            p["status"] = f"not fitted: family {p.get('family')!r} is not arm or mdm"
        elif not all(isinstance(p.get(k), int | float) and p[k] > 0 for k in ("N", "C")):
            p["status"] = f"not fitted: N={p.get('N')!r}, C={p.get('C')!r} (need both > 0)"
    return [p for p in points if p["status"] == "finished" and p.get("loss") is not None]


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
        for key, q in ((data.get("bootstrap") or {}).get("quantities") or {}).items():
            if q["lo"] is not None and "@" not in key:  # exponents and geometric means
                client.log_metric(rid, f"{key.replace('.', '_')}_lo", q["lo"])
                client.log_metric(rid, f"{key.replace('.', '_')}_hi", q["hi"])
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
    points: list[dict], out: Path, source: str, split: str = "validation", unigram: bool = True,
    resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED,
) -> dict:  # fmt: skip
    """Fit the finished points; write fit.json, report.md and the two plots into ``out``.
    With ``unigram``, every point with a loss is compared with its corpus's unigram baseline
    on the same rows first; with ``resamples`` > 0, exponents and gaps get bootstrap
    intervals (``bootstrap``, seeded). Folders in the written files are relative to ``out``."""
    import matplotlib.pyplot as plt

    base = sweep_unigram(points, split) if unigram else skipped(split, "skipped (--no-unigram)")
    good = fittable(points)
    result = fit_study(good)
    boot = None
    if resamples > 0:
        boot = bootstrap(good, resamples, seed, reference=quantities(result))
    data = {"source": source, "points": points, **to_json(result), "bootstrap": boot,
            "unigram": base}  # fmt: skip
    data, points = portable(data, out), portable(points, out)
    write_json_atomic(out / "fit.json", data)
    for name, fig in (("isoflop.png", isoflop_figure(good, result, base)),
                      ("scaling.png", scaling_figure(result))):  # fmt: skip
        save_figure_atomic(fig, out / name)
        plt.close(fig)
    write_text_atomic(out / "report.md", report_markdown(source, points, data))
    return data


def collect(args) -> tuple[list[dict], str, Path | None, dict | None, str | None]:
    """(points, source, sweep folder, sweep.json, MLflow URI) from a sweep folder, MLflow or a
    table."""
    given = [bool(args.sweep), bool(args.mlflow_experiment), bool(args.points)]
    if args.points and sum(given) > 1:
        raise ConfigError("sweep fit: --points FILE.csv fits that table alone; leave out the "
                          "sweep folder and --mlflow-experiment")  # fmt: skip
    if not any(given):
        raise ConfigError("sweep fit: give a sweep folder, --mlflow-experiment NAME or "
                          "--points FILE.csv")  # fmt: skip
    if args.points:
        return read_points(args.points), f"table {Path(args.points).name}", None, None, None
    sweep_dir, sweep = load_sweep(args.sweep) if args.sweep else (None, None)
    uri = args.tracking_uri or (sweep or {}).get("tracking", {}).get("uri")
    if not args.mlflow_experiment:
        points = points_from_sweep(sweep, args.split)
        return points, f"sweep {sweep_dir.name}", sweep_dir, sweep, uri
    if uri is None:
        from trainer.tracking import TrackingConfig, resolve_uri

        uri = resolve_uri(TrackingConfig())
    planned = points_from_sweep(sweep, args.split) if sweep else None
    runs = mlflow_runs(uri, args.mlflow_experiment, sweep["name"] if sweep else args.sweep_tag)
    points = points_from_mlflow(runs, args.split, planned, uri)
    return points, f"MLflow {uri} experiment {args.mlflow_experiment}", sweep_dir, sweep, uri


def cmd_fit(args) -> int:
    if args.bootstrap < 0:
        raise ConfigError(f"--bootstrap: resamples >= 0 (0 = none), got {args.bootstrap}")
    points, source, sweep_dir, sweep, uri = collect(args)
    if not points:
        raise ConfigError(f"no runs found in {sweep_dir or source}")
    experiment = args.mlflow_experiment or (sweep or {}).get("tracking", {}).get("experiment")
    name = sweep["name"] if sweep else args.mlflow_experiment
    out = Path(args.out) if args.out else (sweep_dir or Path(".")) / "fit"
    unigram = not args.no_unigram and not args.points  # a table names no corpus
    data = fit_and_report(points, out, source, args.split, unigram, args.bootstrap, args.seed)
    print((out / "report.md").read_text())
    if not args.no_mlflow and uri and experiment:
        rid = log_to_mlflow(uri, experiment, name, out, data)
        if rid:
            print(f"logged to MLflow run {rid} (sweep-fit) in experiment {experiment}")
    print(f"report: {out / 'report.md'}; numbers: {out / 'fit.json'}", file=sys.stderr)
    return 0
