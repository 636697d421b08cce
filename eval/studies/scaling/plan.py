"""``maskscale sweep plan``: an IsoFLOP grid of training runs, written as plain config files.

Why: the study's scaling laws come from IsoFLOP profiles: at each compute budget C, models of
several sizes N are trained for exactly the tokens D that C = 6 N D allows, and the best loss
per budget traces L_opt(C). Planning such a grid by hand is where mistakes happen (a size that
gets less than one step, a budget that repeats the corpus many times, a sweep that would take a
month), so the plan resolves every point the way the trainer will (preset -> N, budget ->
steps via trainer/budget.py, on the corpus's seq_len) and shows steps, tokens, epochs of the
corpus and an estimated time before anything runs.

With ``--prior`` (an anchor ``N0@C0`` or a previous fit.json) each budget gets its own sizes
from the ``--sizes`` pool, spaced around a prior optimum (``prior``). Runs shorter than
``MIN_STEPS`` are flagged: their warm-up and cosine schedule are a different shape from a long
run's, so their final loss is not on the same IsoFLOP profile.

The result is a folder that any launcher can work from: ``runs/<name>/config.yaml`` per point
(a normal ``maskscale train --config`` file, which is also the run directory) and
``sweep.json`` (the grid, the refused points and where the runs are tracked). Every run is
tagged in MLflow with the sweep's name and its nominal budget, so ``maskscale sweep fit`` can
find them again from MLflow alone.
"""

from __future__ import annotations

import copy
import json
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from eval.measure.outputs import write_json_atomic, write_text_atomic
from eval.studies.scaling.prior import parse_prior, spaced_grid
from pipeline.configlib import ConfigError, apply_overrides, from_dict, read_yaml
from pipeline.shards import read_manifest
from trainer.budget import resolve_budget
from trainer.config import BudgetConfig, TrainConfig, apply_shortcuts
from trainer.model import non_embedding_params
from trainer.presets import list_presets, load_preset
from trainer.tracking import TrackingConfig, resolve_uri

SWEEP_FILE = "sweep.json"
RUNS_DIR = "runs"
FORMAT = "maskscale-sweep/1"
FAMILIES = ("arm", "mdm")
MIN_STEPS = 200
"""Runs with fewer optimizer steps are warned about: the warm-up (max(1% of steps,
warmup_min)) and the cosine decay take a different shape than in a long run."""
SWEEP_KEYS = ("objective", "model", "run_dir", "budget", "flops", "tokens", "steps")
"""Keys the sweep sets per point; a base config or override may not set them."""


@dataclass
class PlanConfig:
    """What ``maskscale sweep plan`` was asked for."""

    budgets: list[float]
    """Training compute budgets C in FLOPs (the IsoFLOP lines)."""
    sizes: list[str]
    """Model presets; the groups ``paper`` (the paper's grid) and ``tiny`` expand."""
    families: list[str] = field(default_factory=lambda: list(FAMILIES))
    """arm and/or mdm."""
    out: str = "sweeps/sweep"
    """The sweep folder (runs/<name>/ and sweep.json go here)."""
    corpus: str | None = None
    """Corpus directory; else the base config's; without one, seq_len is the preset's and
    epochs are unknown (the configs then need corpus= before they can run)."""
    base_config: str | None = None
    """A train YAML every point starts from (default: the paper recipe)."""
    overrides: list[str] = field(default_factory=list)
    """key=value overrides on top of the base config, for every point."""
    name: str | None = None
    """Sweep name (MLflow tag `sweep`); default: the folder's name."""
    tokens_per_s: float | None = None
    """Assumed training tokens/s for time estimates when no run has been measured."""
    measured: list[str] = field(default_factory=list)
    """Finished run directories whose summary.json tokens/s calibrate the time estimates."""
    prior: str | None = None
    """Space each budget's sizes around a prior N_opt(C): ``N0@C0`` or a fit.json (``prior``);
    the sizes are then picked per budget from ``sizes`` (the pool)."""
    prior_exponent: float = 0.5
    """g of an anchor prior N_opt(C) = N0 (C / C0)^g."""
    window: float = 4.0
    """Sizes within [N_opt / window, N_opt x window] of the prior optimum."""
    per_budget: int = 5
    """Sizes per budget with a prior."""
    replace: bool = False
    """Drop the points of earlier plans in the same folder (default: keep them, so that plans
    per family or per budget add up to one sweep)."""

    def validate(self) -> None:
        if not self.budgets or any(not (c > 0 and math.isfinite(c)) for c in self.budgets):
            raise ConfigError(
                f"--budgets: positive FLOP counts, e.g. 1e15,3e15; got {self.budgets}"
            )
        if not self.sizes:
            raise ConfigError("--sizes: at least one model preset, e.g. tiny-0.3M,tiny-1M")
        bad = [f for f in self.families if f not in FAMILIES]
        if bad or not self.families:
            raise ConfigError(f"--families: arm and/or mdm, got {self.families}")
        if self.tokens_per_s is not None and not self.tokens_per_s > 0:
            raise ConfigError(f"--tokens-per-s: must be > 0, got {self.tokens_per_s}")
        if not (self.window > 1 and math.isfinite(self.window)):
            raise ConfigError(f"--window: a factor > 1 (sizes N_opt/w..N_opt*w), got {self.window}")
        if self.per_budget < 3:
            raise ConfigError(f"--per-budget: at least 3 (a parabola needs three sizes), got "
                              f"{self.per_budget}")  # fmt: skip
        if not math.isfinite(self.prior_exponent):
            raise ConfigError(f"--prior-exponent: a number, got {self.prior_exponent}")


@dataclass
class Point:
    """One run of the grid, resolved as the trainer will resolve it."""

    name: str
    family: str
    size: str
    N: int
    C: float
    """The nominal budget (the IsoFLOP line this run belongs to)."""
    steps: int
    tokens: int
    flops: float
    """Realised C = 6 N D after rounding the steps."""
    epochs: float | None
    est_s: float | None
    config: str
    run_dir: str


def parse_budgets(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(
            f"--budgets: comma-separated numbers like 1e15,3e15, got {text!r}"
        ) from None


def expand_sizes(text: str) -> list[str]:
    """Preset names from ``19M,34M`` / ``paper`` / ``tiny`` (groups of presets)."""
    presets = list_presets()
    groups = {
        "paper": [p for p in presets if not p.startswith("tiny")],
        "tiny": [p for p in presets if p.startswith("tiny")],
    }
    sizes: list[str] = []
    for item in (x.strip() for x in text.split(",") if x.strip()):
        for size in groups.get(item, [item]):
            if size not in presets:
                raise ConfigError(
                    f"--sizes: unknown model preset {size!r}; valid: paper, tiny, "
                    + ", ".join(presets)
                )
            if size not in sizes:
                sizes.append(size)
    return sizes


def compact(c: float) -> str:
    """1e+19 -> 1e19, 3.5e+15 -> 3.5e15 (for run names and tags)."""
    return f"{c:.3g}".replace("e+", "e").replace("e0", "e")


def base_data(plan: PlanConfig) -> dict:
    """The base config dict (YAML + overrides); refuses keys the sweep sets per point."""
    data = read_yaml(plan.base_config) if plan.base_config else {}
    rest = apply_shortcuts(data, plan.overrides)
    clash = [o.split("=", 1)[0] for o in rest if o.split("=", 1)[0].split(".")[0] in SWEEP_KEYS]
    if clash:
        raise ConfigError(
            f"overrides {clash}: the sweep sets objective, model, run_dir and the budget per "
            "point; use --families, --sizes and --budgets instead"
        )
    data = apply_overrides(data, rest)
    for key in ("objective", "model", "run_dir", "budget"):
        data.pop(key, None)
    if plan.corpus:
        data["corpus"] = str(Path(plan.corpus).resolve())
    elif data.get("corpus"):
        data["corpus"] = str(Path(data["corpus"]).resolve())
    tracking = data.setdefault("tracking", {})
    tracking["uri"] = resolve_uri(TrackingConfig(uri=tracking.get("uri")))
    tracking.setdefault("experiment", sweep_name(plan))
    return data


def sweep_name(plan: PlanConfig) -> str:
    return plan.name or Path(plan.out).resolve().name


def point_data(base: dict, family: str, size: str, c: float, run_dir: Path, sweep: str) -> dict:
    data = copy.deepcopy(base)
    data.update(objective=family, model=size, budget={"flops": c}, run_dir=str(run_dir))
    tags = data["tracking"].setdefault("tags", {})
    tags.update({"sweep": sweep, "sweep.C": compact(c), "sweep.point": run_dir.name})
    return data


def resolve_point(data: dict, manifest: dict | None) -> tuple[TrainConfig, int, int]:
    """(validated config, N, seq_len) of one point, exactly as the trainer resolves them."""
    probe = dict(data, corpus=data.get("corpus") or "<unset>")
    cfg = from_dict(TrainConfig, probe)
    cfg.validate()
    overrides = dict(cfg.model_overrides)
    if manifest is not None:
        overrides.setdefault("vocab_size", manifest["tokenizer"]["vocab_size"])
        overrides.setdefault("seq_len", manifest["seq_len"])
    model = load_preset(cfg.model, **overrides)
    return cfg, non_embedding_params(model), model.seq_len


def train_rows(manifest: dict | None, cfg: TrainConfig) -> int | None:
    """Rows of the training split(s), for epochs; None when unknown."""
    if manifest is None:
        return None
    names = [cfg.data.split] if isinstance(cfg.data.split, str) else cfg.data.split
    missing = [n for n in names if n not in manifest["splits"]]
    if missing:
        raise ConfigError(f"data.split: {missing} not in the corpus ({list(manifest['splits'])})")
    return sum(int(manifest["splits"][n]["rows"]) for n in names)


def measured_flops_per_s(run_dirs: list[Path]) -> dict[str, dict]:
    """Achieved training FLOP/s (6 N tokens/s) per model preset, from finished runs:
    {preset: {"N": n, "flops_per_s": median over its runs}}."""
    found: dict[str, tuple[int, list[float]]] = {}
    for run_dir in run_dirs:
        path = run_dir / "summary.json"
        if not path.is_file():
            continue
        s = json.loads(path.read_text())
        if s.get("tokens_per_s"):
            rates = found.setdefault(s["model"], (int(s["N"]), []))[1]
            rates.append(6.0 * s["N"] * s["tokens_per_s"])
    return {m: {"N": n, "flops_per_s": statistics.median(v)} for m, (n, v) in found.items()}


def rate_at(n: float, by_n: dict[float, float]) -> float | None:
    """FLOP/s at size ``n`` from the measured sizes ``by_n`` (N -> FLOP/s): the measured value;
    else a power law through the two measured sizes around ``n``; beyond the measured range,
    through the two nearest, its exponent clamped to [0, 1] (FLOP/s that do not fall with N,
    tokens/s that do not rise with it); the one rate when only one size was measured.

    Why not the median of all sizes: a tiny model spends most of a step on fixed costs, so its
    FLOP/s are a fraction of a larger one's (in the CPU study tiny-0.008M ran at 2.35e9, the
    median of the measured sizes was 1.33e10, and its estimate came out 6x too short; this
    gives 2.72e9)."""
    if not by_n:
        return None
    if n in by_n:
        return by_n[n]
    ns = sorted(by_n)
    if len(ns) == 1:
        return by_n[ns[0]]
    below, above = [x for x in ns if x < n], [x for x in ns if x > n]
    a, b = (below[-1], above[0]) if below and above else (ns[:2] if above else ns[-2:])
    slope = math.log(by_n[b] / by_n[a]) / math.log(b / a)
    if not (below and above):
        slope = min(max(slope, 0.0), 1.0)
    return by_n[a] * (n / a) ** slope


def estimate_s(point: Point, measured: dict[str, dict], tokens_per_s: float | None):
    """Seconds for a point: FLOP/s from the measured sizes (``rate_at``), else from
    ``tokens_per_s``, else None (no estimate)."""
    rate = rate_at(point.N, {m["N"]: m["flops_per_s"] for m in measured.values()})
    if rate is None and tokens_per_s:
        rate = 6.0 * point.N * tokens_per_s
    return point.flops / rate if rate else None


def make_plan(plan: PlanConfig) -> dict:
    """Resolve every point; returns the sweep record (not yet written)."""
    plan.validate()
    out = Path(plan.out).resolve()
    base = base_data(plan)
    manifest = read_manifest(base["corpus"]) if base.get("corpus") else None
    name = sweep_name(plan)
    points, refused, configs = [], [], {}
    grid, prior = sizes_per_budget(plan, base, manifest, out, name)
    for family in plan.families:
        for c in plan.budgets:
            for size in grid[(family, c)]:
                run_dir = out / RUNS_DIR / f"{family}-{size}-C{compact(c)}"
                data = point_data(base, family, size, c, run_dir, name)
                cfg, n, seq_len = resolve_point(data, manifest)
                try:
                    b = resolve_budget(BudgetConfig(flops=c), n, cfg.batch.global_batch, seq_len)
                except ConfigError:
                    steps = c / (6 * n * cfg.batch.global_batch * seq_len)
                    refused.append({"name": run_dir.name, "family": family, "size": size,
                                    "N": n, "C": c, "steps": steps})  # fmt: skip
                    continue
                rows = train_rows(manifest, cfg)
                epochs = b.steps * cfg.batch.global_batch / rows if rows else None
                points.append(Point(run_dir.name, family, size, n, c, b.steps, b.tokens,
                                    b.flops, epochs, None, str(run_dir / "config.yaml"),
                                    str(run_dir)))  # fmt: skip
                configs[run_dir.name] = data
    measured = measured_flops_per_s(
        [Path(p) for p in plan.measured] + sorted((out / RUNS_DIR).glob("*"))
    )
    for p in points:
        p.est_s = estimate_s(p, measured, plan.tokens_per_s)
    return {
        "format": FORMAT,
        "name": name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "corpus": base.get("corpus") or None,
        "tracking": {"uri": base["tracking"]["uri"], "experiment": base["tracking"]["experiment"]},
        "plan": asdict(plan),
        "throughput": {
            "measured_flops_per_s": {m: v["flops_per_s"] for m, v in measured.items()},
            "assumed_tokens_per_s": plan.tokens_per_s,
        },
        "points": [asdict(p) for p in points],
        "refused": refused,
        "prior": prior,
        "configs": configs,
    }


def sizes_per_budget(plan: PlanConfig, base: dict, manifest: dict | None, out: Path, name: str):
    """({(family, C): presets}, the prior's record or None): every size at every budget, or
    with ``plan.prior`` the pool's presets spaced around the prior optimum per budget."""
    if plan.prior is None:
        return {(f, c): list(plan.sizes) for f in plan.families for c in plan.budgets}, None
    prior = parse_prior(plan.prior, plan.families, plan.prior_exponent)
    family, c = plan.families[0], plan.budgets[0]  # N does not depend on either
    pool = {}
    for size in plan.sizes:
        data = point_data(base, family, size, c, out / RUNS_DIR / size, name)
        pool[size] = resolve_point(data, manifest)[1]
    return spaced_grid(prior, pool, plan.families, plan.budgets, plan.window, plan.per_budget)


def read_earlier(out: Path) -> dict | None:
    """The folder's sweep.json from earlier plans, or None."""
    path = out / SWEEP_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def check_started(out: Path, sweep: dict, earlier: dict | None) -> None:
    """Refuse to change the config of a run that has already started."""
    old = (earlier or {}).get("configs", {})
    changed = [
        name
        for name, data in sweep["configs"].items()
        if name in old
        and old[name] != data
        and any((out / RUNS_DIR / name / f).exists() for f in ("checkpoints", "summary.json"))
    ]
    if changed:
        raise ConfigError(
            f"{out}: runs {changed} already started with another config; plan into a new "
            "--out folder (or delete those run folders to retrain them)"
        )


def merge_earlier(sweep: dict, out: Path, earlier: dict | None, replace: bool) -> list[str]:
    """Add the points of the folder's earlier plans (``earlier``, their sweep.json) that this
    plan does not redefine (unless ``replace``): planning the ARM and then the MDM into one
    folder must give one sweep of both, not silently drop the first family. Returns the names
    kept (or, with ``replace``, dropped); the plans' own records go to ``sweep["plans"]``,
    oldest first."""
    if earlier is None:
        sweep["plans"] = [sweep["plan"]]
        return []
    if earlier.get("name") != sweep["name"]:
        raise ConfigError(
            f"{out / SWEEP_FILE}: sweep {earlier.get('name')!r} lives here; plan into a new "
            f"--out folder or give --name {earlier.get('name')}"
        )
    new_names = {p["name"] for p in sweep["points"]}
    kept = [p for p in earlier.get("points", []) if p["name"] not in new_names]
    names = [p["name"] for p in kept]
    if replace:
        sweep["plans"] = [sweep["plan"]]
        return names
    sweep["points"] = kept + sweep["points"]
    sweep["configs"] = {**{n: earlier["configs"][n] for n in names}, **sweep["configs"]}
    old_refused = [r for r in earlier.get("refused", []) if r["name"] not in new_names]
    sweep["refused"] = old_refused + sweep["refused"]
    sweep["plans"] = earlier.get("plans", [earlier.get("plan")]) + [sweep["plan"]]
    return names


def write_plan(sweep: dict, out: Path, earlier: dict | None = None) -> None:
    """runs/<name>/config.yaml per point and sweep.json; ``earlier``: the folder's previous
    sweep.json (``read_earlier``), whose started runs may not change config."""
    check_started(out, sweep, earlier)
    for name, data in sweep["configs"].items():
        text = f"# sweep {sweep['name']}: point {name} (maskscale sweep plan)\n"
        text += yaml.safe_dump(data, sort_keys=False)
        write_text_atomic(out / RUNS_DIR / name / "config.yaml", text)
    write_json_atomic(out / SWEEP_FILE, sweep)


def fmt_count(x: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def fmt_time(s: float | None) -> str:
    if s is None:
        return "?"
    for unit, scale in (("d", 86400), ("h", 3600), ("min", 60)):
        if s >= scale:
            return f"{s / scale:.1f}{unit}"
    return f"{s:.0f}s"


def table(sweep: dict) -> str:
    head = f"{'family':<7}{'size':<11}{'N':>8}{'C':>9}{'steps':>9}{'tokens':>9}{'epochs':>8}"
    lines = [head + f"{'est. time':>11}", "-" * (len(head) + 11)]
    for p in sweep["points"]:
        epochs = "?" if p["epochs"] is None else f"{p['epochs']:.2f}"
        lines.append(
            f"{p['family']:<7}{p['size']:<11}{fmt_count(p['N']):>8}{p['C']:>9.3g}"
            f"{p['steps']:>9}{fmt_count(p['tokens']):>9}{epochs:>8}{fmt_time(p['est_s']):>11}"
        )
    total = [p["est_s"] for p in sweep["points"]]
    if total and all(t is not None for t in total):
        lines.append(f"total estimated time (one after another): {fmt_time(sum(total))}")
    return "\n".join(lines)


def warnings_for(sweep: dict) -> list[str]:
    out = []
    for r in sweep["refused"]:
        out.append(
            f"refused {r['name']}: C={r['C']:.3g} gives {r['steps']:.3g} steps of N={r['N']:,} "
            "(< 1 step); raise the budget, drop the size or lower batch.global_batch"
        )
    over = [p for p in sweep["points"] if p["epochs"] is not None and p["epochs"] > 1]
    for p in over:
        out.append(
            f"warning: {p['name']} reads {p['epochs']:.2f} epochs of the corpus (> 1): rows "
            "repeat, so its loss is not a one-epoch loss like the paper's"
        )
    short = [p for p in sweep["points"] if p["steps"] < MIN_STEPS]
    if short:
        shown = ", ".join(f"{p['name']} ({p['steps']})" for p in short[:4])
        more = f" and {len(short) - 4} more" if len(short) > 4 else ""
        out.append(
            f"warning: {len(short)} run(s) train fewer than {MIN_STEPS} steps: {shown}{more}; "
            "their warm-up and cosine schedule differ in shape from a long run's, so their "
            "losses are not on the same IsoFLOP profile: raise the budgets, drop the largest "
            "sizes or lower batch.global_batch"
        )
    out += [f"warning: {note}" for note in (sweep.get("prior") or {}).get("notes", [])]
    if sweep["corpus"] is None:
        out.append(
            "warning: no corpus (--corpus or corpus: in the base config): seq_len is the "
            "preset's, epochs are unknown, and the configs need corpus= before `sweep run`"
        )
    if any(p["est_s"] is None for p in sweep["points"]):
        out.append(
            "note: no time estimate: pass --tokens-per-s or --measured RUN_DIR (a finished run)"
        )
    return out


def cmd_plan(args) -> int:
    plan = PlanConfig(
        budgets=parse_budgets(args.budgets),
        sizes=expand_sizes(args.sizes),
        families=[f.strip() for f in args.families.split(",") if f.strip()],
        out=args.out,
        corpus=args.corpus,
        base_config=args.config,
        overrides=list(args.overrides or []),
        name=args.name,
        tokens_per_s=args.tokens_per_s,
        measured=list(args.measured or []),
        prior=args.prior,
        prior_exponent=args.prior_exponent,
        window=args.window,
        per_budget=args.per_budget,
        replace=args.replace,
    )
    sweep = make_plan(plan)
    if sweep["prior"]:
        print(f"sizes per budget around the prior optimum ({sweep['prior']['source']}; "
              f"window x/÷ {plan.window:g}):")  # fmt: skip
        for row in sweep["prior"]["budgets"]:
            print(f"  {row['family']} C={row['C']:.3g}: N_opt ~ {fmt_count(row['N_opt'])} -> "
                  + (", ".join(row["sizes"]) or "no preset in the window"))  # fmt: skip
    print(table(sweep))
    for line in warnings_for(sweep):
        print(line, file=sys.stderr)
    if not sweep["points"]:
        print("maskscale sweep plan: every point was refused; nothing written", file=sys.stderr)
        return 2
    out = Path(plan.out).resolve()
    planned, earlier = len(sweep["points"]), read_earlier(out)
    others = merge_earlier(sweep, out, earlier, plan.replace)
    write_plan(sweep, out, earlier)
    if others and plan.replace:
        print(f"--replace: dropped {len(others)} point(s) of earlier plans from the sweep "
              f"(their run folders stay): {', '.join(others)}")  # fmt: skip
    elif others:
        print(f"kept {len(others)} point(s) of earlier plans in this folder (--replace drops "
              "them)")  # fmt: skip
    print(f"{len(sweep['points'])} runs ({planned} from this plan) -> {out / RUNS_DIR}; "
          f"{out / SWEEP_FILE}")  # fmt: skip
    print(f"next: maskscale sweep run {plan.out} --launcher local|slurm|ray")
    return 0
