"""MinHash clustering (dedup stage 3) at scale: our array step against datatrove's own.

    python benchmarks/cluster_scale.py --pairs 1e6,1e7

1. Writes (once per size, cached under ``--work``) synthetic ``.dups`` files in datatrove's
   layout (four little-endian uint32 per pair) for ``num_buckets`` = 14 buckets, shaped like
   what datatrove's buckets stage writes: duplicate clusters of 2 + geometric(1/2) documents
   spread over 64 signature files; in each bucket every member collides with probability 0.8
   and the colliding members of a cluster are chained in (file, doc) order, as consecutive
   equal signatures are. A pair therefore recurs in several buckets (about 6 pairs per
   duplicated document, SlimPajama's ~7 at its near-duplicate share). ``days/`` files give
   every document a random day.
2. Runs ``pipeline.cluster.EarliestMinhashCluster`` and datatrove's ``MinhashDedupCluster``
   on the same files, each in a fresh subprocess that reports its wall time for ``run`` and
   its peak RSS (``VmHWM``), plus the peak after imports (the interpreter and libraries).
3. Prints a table with time and peak-memory ratios (time datatrove / ours, memory ours /
   datatrove, in total and above the imports) and projects 10^8 and
   10^9 pairs by a log-log fit of the measured growth of time and of the memory above the
   import baseline over the measured sizes (slope at least 1: see :func:`fit`).
   ``--skip-datatrove-above N`` leaves datatrove out past N pairs (about an hour at 10^8 on a
   small machine). Results go to ``benchmarks/cluster_scale.md`` (a table and the JSON rows);
   ``--replot`` recomputes the projections from the rows recorded there.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BUCKETS, FILES, COLLIDE = 14, 64, 0.8


def synth(folder: Path, pairs: int, seed: int = 0) -> dict:
    """Write .dups and days/ files with about ``pairs`` pairs (see the module docstring)."""
    rng = np.random.default_rng(seed)
    per_cluster = BUCKETS * (COLLIDE * 3 - 1)  # mean size 3: ~ pairs per cluster
    clusters = max(1, int(pairs / per_cluster))
    sizes = 2 + rng.geometric(0.5, clusters) - 1
    nodes = int(sizes.sum())
    docs_per_file = math.ceil(nodes * 3 / FILES)  # a third of the documents are duplicated
    picked = rng.choice(FILES * docs_per_file, nodes, replace=False).astype(np.uint64)
    keys = ((picked // docs_per_file) << np.uint64(32)) | (picked % docs_per_file)
    cluster_of = np.repeat(np.arange(clusters), sizes)
    order = np.lexsort((keys, cluster_of))  # members in (file, doc) order within a cluster
    keys, cluster_of = keys[order], cluster_of[order]
    (folder / "b").mkdir(parents=True, exist_ok=True)
    (folder / "s" / "days").mkdir(parents=True, exist_ok=True)
    written = 0
    for bucket in range(BUCKETS):
        hit = rng.random(nodes) < COLLIDE
        k, c = keys[hit], cluster_of[hit]
        chained = c[1:] == c[:-1]
        a, b = k[:-1][chained], k[1:][chained]
        rec = np.empty((len(a), 4), dtype="<u4")
        rec[:, 0], rec[:, 1] = a >> np.uint64(32), a & np.uint64(0xFFFFFFFF)
        rec[:, 2], rec[:, 3] = b >> np.uint64(32), b & np.uint64(0xFFFFFFFF)
        rec[rng.permutation(len(rec))].tofile(folder / "b" / f"{bucket:05d}_00.dups")
        written += len(rec)
    for f in range(FILES):
        days = rng.integers(700_000, 740_000, docs_per_file, dtype="<i4")
        days.tofile(folder / "s" / "days" / f"{f:05d}.days")
    return {"pairs": written, "nodes": nodes, "clusters": clusters}


def peak_rss() -> int:
    """This process's peak RSS in bytes: VmHWM, which starts afresh at exec (``ru_maxrss``
    does not: a child inherits the peak of the parent that forked it)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # not Linux


def child(which: str, folder: Path) -> None:
    """Run one implementation here (a fresh process) and print its measurements as JSON."""
    out = folder / f"out-{which}"
    if which == "ours":
        from pipeline.cluster import EarliestMinhashCluster

        step = EarliestMinhashCluster(str(folder / "b"), str(folder / "s"), str(out))
    else:
        from datatrove.pipeline.dedup.minhash import MinhashConfig, MinhashDedupCluster

        step = MinhashDedupCluster(str(folder / "b"), str(out), MinhashConfig(num_buckets=BUCKETS))
    base = peak_rss()
    start = time.perf_counter()
    step.run()
    seconds = time.perf_counter() - start
    peak = peak_rss()
    removed = sum(p.stat().st_size for p in out.glob("*.remove")) // 4
    print(json.dumps({"seconds": seconds, "peak_rss": peak, "base_rss": base,
                      "net": peak - base, "removed": removed}))  # fmt: skip


def measure(which: str, folder: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", which, "--work", str(folder)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    if proc.returncode:
        raise SystemExit(f"{which} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def fit(xs: list[float], ys: list[float], at: float) -> float:
    """y at ``at`` on the log-log line through the measured points (least squares), from the
    largest one; a slope under 1 (fixed costs still dominate the smaller sizes, while every
    pair is read and the synthetic clusters grow with the pairs) is taken as 1."""
    lx, ly = np.log(xs), np.log(np.maximum(ys, 1e-9))
    slope = max(1.0, np.polyfit(lx, ly, 1)[0]) if len(xs) > 1 else 1.0
    return float(ys[-1] * (at / xs[-1]) ** slope)


def project(rows: list[dict], which: str, at: float) -> dict | None:
    pts = [r for r in rows if which in r]
    if not pts:
        return None
    xs = [r["pairs"] for r in pts]
    base = pts[-1][which]["base_rss"]
    net = [r[which]["peak_rss"] - r[which]["base_rss"] for r in pts]
    grown = fit(xs, net, at)
    return {"seconds": fit(xs, [r[which]["seconds"] for r in pts], at),
            "peak_rss": base + grown, "net": grown, "projected": True}  # fmt: skip


def table(rows: list[dict]) -> str:
    def cell(m: dict | None, key: str) -> str:
        if m is None:
            return "-"
        v = m[key] / 2**30 if key == "peak_rss" else m[key]
        return f"{'~' if m.get('projected') else ''}{v:.3g}"

    lines = ["| pairs | nodes | ours s | datatrove s | time ratio | ours GiB | datatrove GiB "
             "| memory ratio | above imports |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        o, d = r.get("ours"), r.get("datatrove")
        tr = f"{d['seconds'] / o['seconds']:.1f}x" if o and d else "-"
        mr = f"{o['peak_rss'] / d['peak_rss']:.2f}" if o and d else "-"
        net = f"{o['net'] / d['net']:.2f}" if o and d and "net" in o and "net" in d else "-"
        lines.append(f"| {r['pairs']:.3g} | {r.get('nodes', '-')} | {cell(o, 'seconds')} "
                     f"| {cell(d, 'seconds')} | {tr} | {cell(o, 'peak_rss')} "
                     f"| {cell(d, 'peak_rss')} | {mr} | {net} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", default="1e6,1e7", help="comma-separated pair counts")
    ap.add_argument("--work", default="/tmp/cluster_scale", help="cache of the synthetic files")
    ap.add_argument("--skip-datatrove-above", type=float, default=math.inf)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "cluster_scale.md"))
    ap.add_argument("--replot", action="store_true", help="re-project the rows in --out")
    ap.add_argument("--child", choices=["ours", "datatrove"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child, Path(args.work))
    rows = []
    if args.replot:  # recompute the projections from the rows recorded in --out
        text = Path(args.out).read_text()
        recorded = json.loads(text[text.index("```json") + 7 : text.rindex("```")])
        rows = [r for r in recorded if "nodes" in r]
    for target in [] if args.replot else (int(float(x)) for x in args.pairs.split(",")):
        folder = Path(args.work) / f"{target:.0e}"
        meta = folder / "meta.json"
        if not meta.exists():
            meta.parent.mkdir(parents=True, exist_ok=True)
            meta.write_text(json.dumps(synth(folder, target)))
        row = json.loads(meta.read_text())
        row["ours"] = measure("ours", folder)
        if target <= args.skip_datatrove_above:
            row["datatrove"] = measure("datatrove", folder)
            # same clusters, so the same number of documents removed (which ones differs:
            # datatrove keeps its union-find root, we keep the earliest-dated member)
            assert row["datatrove"]["removed"] == row["ours"]["removed"], row
        rows.append(row)
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    rows += [{"pairs": at, "ours": project(rows, "ours", at),
              "datatrove": project(rows, "datatrove", at)} for at in (1e8, 1e9)]  # fmt: skip
    text = table(rows)
    print(text)
    Path(args.out).write_text(
        "# MinHash clustering: maskscale's array step vs datatrove's MinhashDedupCluster\n\n"
        f"`python benchmarks/cluster_scale.py --pairs {args.pairs}` (see its docstring). "
        "Ratios: time datatrove/ours, memory ours/datatrove (peak RSS, and peak RSS above "
        "each process's RSS after its imports). `~`: projected by a log-log fit of the "
        "measured sizes (memory: growth above the import baseline). Machine: 2 shared cores "
        "(other jobs running: timings are noisy, ratios within one run comparable).\n\n"
        f"{text}\n\n```json\n{json.dumps(rows, indent=1)}\n```\n"
    )


if __name__ == "__main__":
    main()
