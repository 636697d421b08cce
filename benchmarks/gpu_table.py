"""One markdown report of a GPU check, rebuilt from whatever its files hold: gpu_check.sh's.

Why a separate printer: the device check runs several benchmark processes (trainer_bench.py on
the 1B model with compiled vs eager, on a smaller one with loss and cut-row variants, then
sampling_bench.py) and pytest; each writes its own file as it goes, and any of them may have
stopped early. This script reads what exists -- here, after the files came back, as well as
there -- and prints: the device and versions (from the JSON headers), the pytest result, one
row per model and variant with tokens/s, MFU (the project's count, litgpt's 6 x all parameters
in brackets), MDM/ARM step time, the step time relative to the run's first variant and peak
memory, the cut-row and loader ratios, the MDM vs ARM sampling section, and a list of
everything not measured (failed with its kind and message, killed by the time limit, skipped,
never written), so a failed variant is a row that says what failed, never a silent gap.

    python benchmarks/gpu_table.py OUT/bench_1b.json OUT/bench_170m.json OUT/sampling.json
    python benchmarks/gpu_table.py --check OUT/*.json OUT/pytest.xml   # exit 1 on real failures

``--check`` exits 1 when something failed that was not injected (MASKSCALE_BENCH_FAIL), a run
left a variant unfinished, a file is missing, or a pytest test failed.
"""

from __future__ import annotations

import argparse
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def header_line(results: list[dict]) -> str:
    """The device and software of the first result with a header (GPUs differ: all named)."""
    heads = [r["header"] for r in results if r.get("header")]
    if not heads:
        return "(no header: the JSON predates gpu_check's headers)"
    h = heads[0]
    gpu = h.get("gpu") or {}
    where = (
        f"{gpu['name']} ({gpu['memory_gib']} GiB)" if gpu else f"CPU ({h.get('cpu_count')} cores)"
    )
    names = sorted({(x.get("gpu") or {}).get("name", "CPU") for x in heads})
    also = f" [runs on: {', '.join(names)}]" if len(names) > 1 else ""
    return (
        f"{where}{also}, driver {h.get('driver') or '-'}, torch {h.get('torch')}, CUDA "
        f"{h.get('cuda') or '-'}, cuDNN {h.get('cudnn') or '-'}, DeepSpeed "
        f"{h.get('deepspeed') or '-'}, Triton {h.get('triton') or '-'}, Python "
        f"{h.get('python')}; host {h.get('host')}, {h.get('time_utc')}; TORCH_LOGS="
        f"{h.get('torch_logs') or '-'}"
    )


def _cell(record: dict | None, field: str, spec: str, status: bool = True) -> str:
    """The value, or (``status``) what became of a record without one."""
    if record is None:
        return "-"
    if record["status"] == "ok":
        return _fmt(record.get(field), spec)
    if not status:
        return "-"
    if record["status"] == "failed":
        return f"FAILED ({record['error']['kind']})"
    return {"running": "UNFINISHED", "skipped": "skipped"}.get(record["status"], record["status"])


def _mfu(record: dict | None) -> str:
    if record is None or record["status"] != "ok" or record.get("mfu") is None:
        return _cell(record, "mfu", ".1%", status=False)
    return f"{record['mfu']:.1%} ({record['mfu_all_params']:.1%})"


def _ok(*records) -> bool:
    return all(r is not None and r["status"] == "ok" for r in records)


def trainer_rows(result: dict) -> list[str]:
    """Table rows of one trainer_bench.py result: one per model and step variant."""
    records = [r for r in result["records"] if r["variant"] not in ("cut-rows", "loader")]
    by_key = {(r["model"], r["variant"], r["objective"]): r for r in records}
    ref = result.get("reference_variant")
    lines = []
    for model, variant in dict.fromkeys((r["model"], r["variant"]) for r in records):
        arm, mdm = by_key.get((model, variant, "arm")), by_key.get((model, variant, "mdm"))
        first = arm or mdm
        shape = f"{first['micro']}x{first['accum']}x{first['seq_len']}"
        ratio = f"{mdm['step_s'] / arm['step_s']:.3f}" if _ok(arm, mdm) else "-"
        rel = []
        for fam, rec in (("arm", arm), ("mdm", mdm)):
            base = by_key.get((model, ref, fam))
            rel.append(f"{rec['step_s'] / base['step_s']:.3f}" if _ok(rec, base) else "-")
        name = variant + (f" ({', '.join(first['overrides'])})" if first.get("overrides") else "")
        lines.append(
            f"| {model} | {shape} | {name} | {_cell(arm, 'tokens_per_s', ',.0f')} | {_mfu(arm)} | "
            f"{_cell(mdm, 'tokens_per_s', ',.0f')} | {_mfu(mdm)} | {ratio} | {'/'.join(rel)} | "
            f"{_cell(arm, 'peak_gb', '.1f', False)}/{_cell(mdm, 'peak_gb', '.1f', False)} |"
        )
    return lines


def trainer_notes(result: dict) -> list[str]:
    """The cut-row probe and the loader's headroom over the trainer's rows/s."""
    notes = []
    loader = next((r for r in result["records"] if r["variant"] == "loader"), None)
    for r in result["records"]:
        if r["variant"] == "cut-rows" and r["status"] == "ok":
            notes.append(
                f"{r['model']} one cut row, fwd+bwd, per-row fused/dense mask: "
                f"{r['fused_over_dense']:.3f} ({r['fused_s'] * 1e3:.1f} vs "
                f"{r['dense_mask_s'] * 1e3:.1f} ms; no cut {r['no_cut_s'] * 1e3:.1f} ms)"
            )
    if loader is not None and loader["status"] == "ok":
        steps = [r for r in result["records"] if r["status"] == "ok" and "step_s" in r]
        worst = max(steps, key=lambda r: r["micro"] * r["accum"] / r["step_s"], default=None)
        if worst is not None:
            need = worst["micro"] * worst["accum"] / worst["step_s"]
            notes.append(
                f"loader {loader['rows_per_s']:,.0f} rows/s vs the fastest trainer variant "
                f"({worst['label']}) {need:,.1f} rows/s: {loader['rows_per_s'] / need:,.0f}x "
                "(goal >= 20x)"
            )
    return notes


def trainer_table(results: list[dict]) -> str:
    ref = {r.get("reference_variant") for r in results} - {None}
    head = (
        "| model | micro x accum x seq | variant | ARM tokens/s | ARM MFU (all params) | "
        "MDM tokens/s | MDM MFU (all params) | MDM/ARM step time | step time vs "
        f"{'/'.join(sorted(ref)) or 'first'} (ARM/MDM) | peak GiB (ARM/MDM) |"
    )
    lines = ["## Training steps", "", head, "|" + "---|" * 10]
    notes = []
    for result in results:
        lines += trainer_rows(result)
        notes += trainer_notes(result)
    return "\n".join(lines + ([""] + [f"- {n}" for n in notes] if notes else []))


def sampling_table(result: dict) -> str:
    """Markdown section of one sampling_bench.py result: per batch size and MDM strategy, the
    ARM's tokens/s, the MDM's at each step count (and its ratio to the ARM) and the crossover
    (largest MDM step count faster than the ARM)."""
    a = result["args"]
    length = a["length"]
    done = [b for b in result["results"] if b.get("status", "ok") == "ok"]
    steps = sorted({r["steps"] for b in done for r in b["rows"] if r["steps"]})
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
    for b in done:
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


def not_measured(named: list[tuple[str, dict]]) -> list[dict]:
    """Everything that has no number: failed, unfinished, skipped (file name, label, ...)."""
    out = []
    for name, result in named:
        if result.get("error"):  # the run failed before its first variant
            label = f"{result.get('benchmark', 'benchmark')} setup"
            out.append({"file": name, "label": label, "status": "failed", "error": result["error"]})
        items = result.get("records") or result.get("results") or []
        for r in items:
            status = r.get("status", "ok")
            if status == "ok":
                continue
            label = r.get("label") or f"sampling/batch{r.get('batch')}"
            out.append({"file": name, "label": label, "status": status, **r})
    return out


def failure_lines(missing: list[str], items: list[dict]) -> list[str]:
    lines = [
        f"- `{m}`: not written (the section was skipped or died before its first record)"
        for m in missing
    ]
    for r in items:
        where = f"`{r['label']}` ({r['file']})"
        if r["status"] == "failed":
            e = r["error"]
            injected = " [injected]" if e.get("injected") else ""
            lines.append(
                f"- {where}: FAILED {e['kind']}{injected}: {e['type']}: {e['message'][:300]}"
            )
        elif r["status"] == "running":
            lines.append(f"- {where}: UNFINISHED: the process died or was killed while it ran")
        else:
            lines.append(f"- {where}: {r['status']}: {r.get('reason', '')}")
    return lines


def pytest_summary(path: Path) -> tuple[str, int]:
    """One line from a pytest --junitxml file, and how many tests failed or errored."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    count = {
        k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")
    }
    bad = [
        f"{c.get('classname')}::{c.get('name')}"
        for s in suites
        for c in s.iter("testcase")
        if c.find("failure") is not None or c.find("error") is not None
    ]
    passed = count["tests"] - count["failures"] - count["errors"] - count["skipped"]
    line = (
        f"pytest ({path.name}): {passed} passed, {count['failures']} failed, {count['errors']} "
        f"errors, {count['skipped']} skipped" + (f"; failing: {', '.join(bad)}" if bad else "")
    )
    return line, count["failures"] + count["errors"]


def report(paths: list[Path]) -> tuple[str, bool]:
    """The markdown report and whether everything not measured was injected on purpose."""
    named, missing, tests, test_failures = [], [], [], 0
    for p in paths:
        if p.suffix not in (".json", ".xml"):
            print(f"gpu_table: ignoring {p} (reads .json and pytest .xml files)", file=sys.stderr)
        elif not p.is_file():
            missing.append(str(p))
        elif p.suffix == ".xml":
            line, bad = pytest_summary(p)
            tests.append(line)
            test_failures += bad
        else:
            try:
                named.append((p.name, json.loads(p.read_text())))
            except json.JSONDecodeError as exc:
                missing.append(f"{p} (unreadable JSON: {exc})")
    results = [r for _, r in named]
    sections = ["# GPU check", "", header_line(results)] + ([""] + tests if tests else [])
    trainer = [r for r in results if r.get("benchmark") == "trainer"]
    if trainer:
        sections += ["", trainer_table(trainer)]
    for r in results:
        if r.get("benchmark") == "sampling":
            sections += ["", sampling_table(r)]
    items = not_measured(named)
    lines = failure_lines(missing, items)
    sections += ["", "## Not measured", ""] + (lines or ["nothing: every planned number is above"])
    real = [r for r in items if not (r["status"] == "failed" and r["error"].get("injected"))]
    return "\n".join(sections), not (missing or real or test_failures)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+", type=Path, help="benchmark JSONs and pytest XML")
    p.add_argument("--check", action="store_true", help="exit 1 unless every failure was injected")
    args = p.parse_args(argv)
    if not any(f.is_file() for f in args.files):
        print("no benchmark file found: " + ", ".join(map(str, args.files)), file=sys.stderr)
        return 1
    text, clean = report(args.files)
    print(text)
    return 1 if args.check and not clean else 0


if __name__ == "__main__":
    sys.exit(main())
