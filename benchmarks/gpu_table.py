"""One markdown table from trainer_bench.py JSON files: what gpu_check.sh reports.

Why a separate printer: the device check runs several trainer_bench invocations (the 1B run
with compiled-vs-eager, a smaller one with loss and cut-row comparisons); the issue note and
the README want one table with tokens/s, MFU, MDM/ARM step time, peak memory and the
compiled/eager ratio side by side. MFU of a comparison variant is scaled from the main run's
MFU by the step-time ratio (same model, tokens and device). A sampling_bench.py JSON (MDM vs ARM
sampling speed) becomes its own section after the trainer table.

    python benchmarks/gpu_table.py OUT/bench_1b.json OUT/bench_170m.json OUT/sampling.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def rows_of(result: dict) -> list[dict]:
    """Table rows of one trainer_bench result: the main run, then each comparison variant."""
    a = result["args"]
    rows = []
    for m in result["models"]:
        base = {"model": m["model"], "batch": f"{m['micro']}x{a['accum']}x{a['seq_len']}"}
        main = {"variant": f"compile={a['compile']} loss_chunk={a['loss_chunk']}"}
        for fam in ("arm", "mdm"):
            main[fam] = m[fam]
        rows.append({**base, **main, "mdm_over_arm": m["mdm_over_arm"]})
        tps = m["tokens_per_step"]
        for key in ("compile", "loss"):
            if key not in m:
                continue
            comp = m[key]
            for label in [k for k in comp["arm"] if k != "ratio"]:
                row = {**base, "variant": label}
                for fam in ("arm", "mdm"):
                    v = comp[fam][label]
                    mfu = m[fam].get("mfu")
                    scaled = mfu * m[fam]["step_s"] / v["step_s"] if mfu else None
                    row[fam] = {"tokens_per_s": tps / v["step_s"], "mfu": scaled, **v}
                row["mdm_over_arm"] = row["mdm"]["step_s"] / row["arm"]["step_s"]
                rows.append(row)
    return rows


def table(results: list[dict]) -> str:
    head = (
        "| model | micro x accum x seq | variant | ARM tokens/s | ARM MFU | MDM tokens/s | "
        "MDM MFU | MDM/ARM step time | peak GiB (ARM/MDM) |"
    )
    lines = [head, "|" + "---|" * 9]
    for result in results:
        for r in rows_of(result):
            arm, mdm = r["arm"], r["mdm"]
            lines.append(
                f"| {r['model']} | {r['batch']} | {r['variant']} | "
                f"{arm['tokens_per_s']:,.0f} | {_fmt(arm.get('mfu'), '.1%')} | "
                f"{mdm['tokens_per_s']:,.0f} | {_fmt(mdm.get('mfu'), '.1%')} | "
                f"{r['mdm_over_arm']:.3f} | "
                f"{_fmt(arm.get('peak_gb'), '.1f')}/{_fmt(mdm.get('peak_gb'), '.1f')} |"
            )
    ratios = []
    for result in results:
        for m in result["models"]:
            for key, (new, old) in {
                "compile": ("compiled", "eager"),
                "loss": ("chunked", "plain"),
            }.items():
                if key in m:
                    r = "/".join(f"{m[key][f]['ratio']:.3f}" for f in ("arm", "mdm"))
                    ratios.append(f"{m['model']} {new}/{old} step time (ARM/MDM): {r}")
            if "cut" in m:
                ratios.append(
                    f"{m['model']} one cut row, per-row fused/dense mask: "
                    f"{m['cut']['fused_over_dense']:.3f}"
                )
    return "\n".join(lines + [""] + ratios)


def sampling_table(result: dict) -> str:
    """Markdown section of one sampling_bench.py result: per batch size and MDM strategy, the
    ARM's tokens/s, the MDM's at each step count (and its ratio to the ARM) and the crossover
    (largest MDM step count faster than the ARM)."""
    a = result["args"]
    length = a["length"]
    steps = sorted({r["steps"] for b in result["results"] for r in b["rows"] if r["steps"]})
    steps.reverse()
    lines = [
        "## MDM vs ARM sampling",
        "",
        f"{a['model']} (vocab {a['vocab']}), {result['device_name']} {a['dtype']}, "
        f"{result['threads']} thread(s), prompt {a['prompt']}, L = {length}, temperature "
        f"{a['temperature']:g}, median of {a['repeats']} ({result['clock']} time); answer "
        "tokens/s, MDM as a ratio to the ARM KV cache in brackets.",
        "",
        "| batch | ARM kv-cache | MDM strategy | "
        + " | ".join(f"{n} steps (L/{length / n:g})" for n in steps)
        + " | MDM faster at | L/4 goal |",
        "|" + "---|" * (5 + len(steps)),
    ]
    for b in result["results"]:
        arm = {r["sampler"]: r["tokens_per_s"] for r in b["rows"] if r["family"] == "arm"}
        arm_cell = "; ".join(
            f"{v:,.0f}" if name == "ARM kv-cache" else f"{name[4:]} {v:,.0f}"
            for name, v in arm.items()
        )
        for strategy, n in b["crossover"].items():
            cells = {r["steps"]: r for r in b["rows"] if r["strategy"] == strategy}
            mdm = [
                f"{cells[k]['tokens_per_s']:,.0f} ({cells[k]['vs_arm']:.2f}x)"
                if k in cells
                else "-"
                for k in steps
            ]
            where = "never" if n is None else f"<= {n} steps"
            goal = "met" if n is not None and n >= length / 4 else "missed"
            lines.append(
                f"| {b['batch']} | {arm_cell} | {strategy} | "
                + " | ".join(mdm)
                + f" | {where} | {goal} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    paths = [Path(p) for p in (argv if argv is not None else sys.argv[1:])]
    results = [json.loads(p.read_text()) for p in paths if p.is_file()]
    if not results:
        print("no benchmark JSON found: " + ", ".join(map(str, paths)), file=sys.stderr)
        return 1
    trainer = [r for r in results if r.get("benchmark") != "sampling"]
    sections = [table(trainer)] if trainer else []
    sections += [sampling_table(r) for r in results if r.get("benchmark") == "sampling"]
    print("\n\n".join(sections))
    return 0


if __name__ == "__main__":
    sys.exit(main())
