"""Print refnet/peer time ratios from one pytest-benchmark run.

    pytest benchmarks/ --benchmark-json=run.json
    python benchmarks/compare.py run.json [--json]

Benchmarks are paired by group: ``impl=refnet`` against ``impl=torch`` of the same group. With
``--json`` the output is an object mapping each group to its refnet/torch ratio (mean times).
Groups without a peer report their ``extra_info`` ratios: mp against refnet float64, the
fp16/bf16 emulation against refnet float32 of the same model, ``study --quick`` against its 60 s
target.
"""

import argparse
import json
import sys


def ratios(run: dict) -> dict:
    by_group = {}
    for bench in run["benchmarks"]:
        impl = bench.get("params", {}).get("impl") if bench.get("params") else None
        by_group.setdefault(bench["group"], {})[impl or "refnet"] = bench
    out = {}
    for group, impls in sorted(by_group.items()):
        if "refnet" in impls and "torch" in impls:
            out[group] = impls["refnet"]["stats"]["mean"] / impls["torch"]["stats"]["mean"]
        else:
            extra = impls.get("refnet", {}).get("extra_info", {})
            for key in ("ratio_to_float64", "ratio_to_float32", "ratio_to_target"):
                if key in extra:
                    out[group] = extra[key]
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="pytest-benchmark JSON of one run")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    with open(args.run) as f:
        result = ratios(json.load(f))
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(f"{'group':<36} {'ratio':>10}")
        for group, ratio in result.items():
            kind = ("refnet/float64" if group.startswith("mp-") else
                    "emulated/float32" if group.startswith("emulation-") else
                    "time/60 s target" if group.startswith("study-") else "refnet/torch")
            print(f"{group:<36} {ratio:>10.3g}  ({kind})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
