"""mmfast benchmark suite: `python -m benchmarks [options]` (what `make bench` runs).

Discovers benchmarks/bench_<op>.py, measures every provider side by side on each case
(shapes from real models), dtype and mode, and writes
  * a Markdown table (stdout and <out>/results.md): time, speedup over the eager reference
    and over torch.compile, GFLOP/s (and % of this machine's GEMM peak) or GB/s, peak memory
    (RSS; on CPU also the peak of live bytes: benchmarks/harness.py), saved-for-backward
    memory, and the implementation that ran;
  * one JSON line per measurement with machine, versions and git commit (<out>/results.jsonl);
  * PNG bar charts of the speedups (<out>/<op>.png).
"""

import argparse
import importlib
import json
import os
import pkgutil
import sys
import time

import torch

from benchmarks import harness


def discover() -> dict:
    import benchmarks

    found = {}
    for info in pkgutil.iter_modules(benchmarks.__path__):
        if info.name.startswith("bench_"):
            module = importlib.import_module(f"benchmarks.{info.name}")
            found[module.OP] = module
    return found


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ops", nargs="*", help="op name stems (default: all)")
    p.add_argument("--cases", nargs="*", help="substrings of case names to keep")
    p.add_argument("--dtypes", nargs="*", choices=list(harness.DTYPE_NAMES), help="default: per case")
    p.add_argument("--modes", nargs="*", choices=harness.MODES, help="default: per op")
    p.add_argument("--providers", nargs="*", help="substrings of provider names to keep")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="small shapes and short timing")
    p.add_argument("--out", default="benchmarks/results", help="output folder")
    p.add_argument("--list", action="store_true", help="list ops, cases and providers, then exit")
    return p.parse_args(argv)


def plan(modules, args, device):
    jobs = []
    for op, module in sorted(modules.items()):
        if args.ops and op not in args.ops:
            continue
        providers = [pr for pr in module.providers(device)
                     if not args.providers or any(s in pr.name for s in args.providers)]
        for case in module.cases(args.quick):
            if args.cases and not any(s in case.name for s in args.cases):
                continue
            for dtype in args.dtypes or case.dtypes:
                for mode in args.modes or module.MODES:
                    if mode not in module.MODES:
                        continue
                    jobs.append((op, case, providers, dtype, mode))
    return jobs


def fmt(v, spec):
    return "—" if v is None else format(v, spec)


def table(rows: list, peaks: dict) -> str:
    """Markdown table; speedups are relative to the eager reference and torch.compile of the
    same (op, case, dtype, mode), measured in this run."""
    base = {}
    for r in rows:
        if r.time_ms is not None and r.kind in ("eager", "compile"):
            base[(r.op, r.case, r.dtype, r.mode, r.kind)] = r.time_ms
    lines = ["| op | case | dtype | mode | provider (implementation) | time ms [q20, q80] | "
             "× eager | × compile | GFLOP/s (% GEMM peak) | GB/s | peak MiB | live MiB | "
             "saved MiB |",
             "|" + "---|" * 13]
    for r in rows:
        key = (r.op, r.case, r.dtype, r.mode)
        if r.error:
            lines.append(f"| {r.op} | {r.case} | {r.dtype} | {r.mode} | {r.provider} | "
                         f"{r.error} | | | | | | | |")
            continue
        eager = base.get(key + ("eager",))
        comp = base.get(key + ("compile",))
        sp = lambda b: "—" if b is None else f"{b / r.time_ms:.2f}×"  # noqa: E731
        impl = r.implementation if r.implementation != r.provider else ""
        name = f"{r.provider} ({impl})" if impl else r.provider
        flops = "—"
        if r.gflops is not None:
            peak = r.gemm_peak_gflops or peaks.get((r.device, r.dtype))
            flops = f"{r.gflops:.1f}" + (f" ({100 * r.gflops / peak:.0f}%)" if peak else "")
        lines.append(
            f"| {r.op} | {r.case} | {r.dtype} | {r.mode} | {name} | "
            f"{r.time_ms:.3f} [{fmt(r.time_q20_ms, '.3f')}, {fmt(r.time_q80_ms, '.3f')}] | "
            f"{sp(eager)} | {sp(comp)} | {flops} | {fmt(r.gbps, '.1f')} | "
            f"{fmt(r.peak_mib, '.1f')} | {fmt(r.live_mib, '.1f')} | {fmt(r.saved_mib, '.1f')} |")
    return "\n".join(lines)


def charts(rows: list, out_dir: str) -> list:
    """One PNG per op: speedup over the eager reference of every non-eager provider."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    base = {(r.op, r.case, r.dtype, r.mode): r.time_ms for r in rows
            if r.kind == "eager" and r.time_ms}
    for op in sorted({r.op for r in rows}):
        series = {}
        labels = []
        for r in rows:
            key = (r.op, r.case, r.dtype, r.mode)
            if r.op != op or r.kind == "eager" or not r.time_ms or key not in base:
                continue
            label = f"{r.case}\n{r.dtype} {r.mode}"
            if label not in labels:
                labels.append(label)
            series.setdefault(r.provider, {})[label] = base[key] / r.time_ms
        if not labels:
            continue
        fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(labels)), 4))
        width = 0.8 / max(len(series), 1)
        for i, (prov, vals) in enumerate(series.items()):
            xs = [j + i * width for j in range(len(labels))]
            ax.bar(xs, [vals.get(lab, 0) for lab in labels], width, label=prov)
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xticks([j + width * (len(series) - 1) / 2 for j in range(len(labels))])
        ax.set_xticklabels(labels, fontsize=7)
        ax.set_ylabel("speedup over eager reference")
        ax.set_title(f"mmfast {op}")
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = os.path.join(out_dir, f"{op}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    device = torch.device(args.device)
    modules = discover()
    jobs = plan(modules, args, device)
    if args.list:
        for op, case, providers, dtype, mode in jobs:
            print(op, case.name, dtype, mode, ", ".join(p.name for p in providers))
        return 0
    if not jobs:
        print("no benchmark matches the options", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    info = harness.machine_info(device)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    peaks = {}
    for dtype in sorted({j[3] for j in jobs}):
        peaks[(device.type, dtype)] = harness.gemm_peak_gflops(device, dtype, args.quick)
    try:
        from tqdm import tqdm
        progress = tqdm(jobs, file=sys.stderr, dynamic_ncols=True)
    except ImportError:
        progress = jobs
    rows = []
    jsonl = open(os.path.join(args.out, "results.jsonl"), "a")
    for op, case, providers, dtype, mode in progress:
        if hasattr(progress, "set_description"):
            progress.set_description(f"{op} {case.name} {dtype} {mode}"[:60])
        for m in harness.measure_group(op, case, providers, dtype, mode, device, args.quick):
            rows.append(m)
            record = dict(vars(m), date=stamp, machine=info,
                          gemm_peak_gflops_at_start=peaks.get((device.type, dtype)))
            jsonl.write(json.dumps(record) + "\n")
        jsonl.flush()
    jsonl.close()
    header = (f"mmfast benchmarks, {stamp}, {info['cpu']} ({info['threads']} threads"
              f"{', ' + info['gpu'] if 'gpu' in info else ''}), torch {info['torch']}, "
              f"commit {info['git_commit']}, CPU build {info.get('mmfast_cpu_isa', '?')}, "
              f"CPU projector GEMMs: bfloat16 {info.get('mmfast_cpu_bf16_gemm', '?')}, "
              f"float16 {info.get('mmfast_cpu_f16_gemm', '?')}, "
              f"float32 {info.get('mmfast_cpu_f32_gemm', '?')}; CPU cross_attention bfloat16 "
              f"forward: {info.get('mmfast_cpu_xattn_bf16', '?')}; CPU bipartite_merge first "
              f"pass: {info.get('mmfast_cpu_merge_gemm', '?')}\n"
              "GEMM peak measured here at the start (each row's % is of the peak timed in its own "
              "rounds): " + ", ".join(
                  f"{dt} {v:.0f} GFLOP/s" for (_, dt), v in sorted(peaks.items())))
    md = header + "\n\n" + table(rows, peaks) + "\n"
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(md)
    pngs = charts(rows, args.out)
    print(md)
    print(f"results: {args.out}/results.md, {args.out}/results.jsonl, " + ", ".join(pngs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
