"""Every benchmark in one run: one table of figures beside their targets, and one JSON file.

`make bench` runs ``python -m benchmarks.run_all``. Figures are ratios measured in this run
(e.g. the gradient stage against a plain forward+backward on the same batches), so they hold
across machines better than absolute times; the JSON keeps the raw seconds and bytes too.

Run: python -m benchmarks.run_all [--only gradients,merge] [--quick] [--out FILE]
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
import traceback

from benchmarks.common import Results, machine, print_table, write_json

BENCHES = (
    "gradients",
    "sketch",
    "conflict",
    "merge",
    "overhead",
    "smollm2",
    "cpu_memory",
    "call_price",
    "bergson",
)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help=f"comma-separated subset of {','.join(BENCHES)}")
    ap.add_argument("--quick", action="store_true", help="small sizes: a smoke run in seconds")
    ap.add_argument("--out", default="benchmarks/results.json", help="JSON output path")
    args = ap.parse_args(argv)
    names = [n for n in args.only.split(",") if n] or list(BENCHES)
    unknown = sorted(set(names) - set(BENCHES))
    if unknown:
        ap.error(f"unknown benchmarks {unknown}; known: {', '.join(BENCHES)}")

    results: list[Results] = []
    failed: dict[str, str] = {}
    t_all = time.perf_counter()
    for name in names:
        print(f"\n=== {name} ===", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        try:
            res = importlib.import_module(f"benchmarks.bench_{name}").run(quick=args.quick)
        except Exception:  # one broken benchmark must not hide the others' figures
            failed[name] = traceback.format_exc()
            print(failed[name], file=sys.stderr)
            continue
        res.seconds = time.perf_counter() - t0
        results.append(res)
        print(f"=== {name}: {res.seconds:.0f} s ===", file=sys.stderr, flush=True)
    total = time.perf_counter() - t_all

    print()
    print_table(results)
    missed = [f for r in results for f in r.figures if f.ok is False]
    print(
        f"\n{sum(len(r.figures) for r in results)} figures, {len(missed)} targets missed, "
        f"{len(failed)} benchmarks failed; {total / 60:.1f} min in all "
        f"({', '.join(f'{r.bench} {r.seconds:.0f} s' for r in results)})"
    )
    write_json(
        args.out,
        {
            "machine": machine(),
            "quick": args.quick,
            "seconds": round(total, 1),
            "results": [r.to_dict() for r in results],
            "failed": failed,
        },
    )
    print(f"wrote {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
