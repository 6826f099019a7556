"""Print refnet/peer time ratios from one pytest-benchmark run.

    pytest benchmarks/ --benchmark-json=run.json
    python benchmarks/compare.py run.json [--json] [--stat mean|median|min]

Benchmarks are paired by group: ``impl=refnet`` against ``impl=torch`` of the same group. With
``--json`` the output is an object mapping each group to its refnet/torch ratio (mean times;
``--stat median`` or ``min`` compares those instead, robust to rounds slowed by other work).
The text output adds, where the refnet benchmark measured them, the same ratios from
interleaved pairs (``paired_ratio_to_torch``, ``paired_refnet_over_floor``,
``paired_ratio_to_float32``): the median of
pairs of blocks run back to back, which the VM's drift between two groups' runs cannot move.
A ``gemm-floor-G`` group (the bare numpy GEMMs of group G's refnet step) maps to refnet/floor,
refnet's time in G over the floor's; the text output adds floor/torch, what numpy's BLAS does
against torch's on the machine.
Groups without a peer report their ``extra_info`` ratios: mp and verify against refnet float64
of the same net, the fp16/bf16 emulation against refnet float32 of the same model, ``study
--quick`` against its 60 s target. The text output adds, where a group has them, the speed-up
over the mpmath path and the peak RSS.
"""

import argparse
import json
import sys

FLOOR = "gemm-floor-"
# The ratios a group's refnet benchmark also measures in interleaved pairs (test_bench.py's
# paired_ratio: both sides in the same machine state), by the name printed beside them.
PAIRED = {"paired_ratio_to_torch": "refnet/torch", "paired_refnet_over_floor": "refnet/floor",
          "paired_ratio_to_float32": "emulated/float32"}


def ratios(run: dict, stat: str = "mean") -> dict:
    by_group = {}
    for bench in run["benchmarks"]:
        impl = bench.get("params", {}).get("impl") if bench.get("params") else None
        by_group.setdefault(bench["group"], {})[impl or "refnet"] = bench
    out = {}
    for group, impls in sorted(by_group.items()):
        base = by_group.get(group[len(FLOOR):], {}) if group.startswith(FLOOR) else {}
        if "refnet" in base and "refnet" in impls:
            out[group] = base["refnet"]["stats"][stat] / impls["refnet"]["stats"][stat]
        elif "refnet" in impls and "torch" in impls:
            out[group] = impls["refnet"]["stats"][stat] / impls["torch"]["stats"][stat]
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
    parser.add_argument("--stat", choices=["mean", "median", "min"], default="mean",
                        help="the statistic of each side's rounds the peer ratios compare (mean; "
                             "median and min are robust to rounds slowed by other work)")
    args = parser.parse_args(argv)
    with open(args.run) as f:
        run = json.load(f)
    result = ratios(run, args.stat)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        extras = extra_info(run)
        print(f"{'group':<36} {'ratio':>10}")
        for group, ratio in result.items():
            kind = ("refnet/float64" if group.startswith("mp-") else
                    "verify/float64" if group.startswith("verify-") else
                    "emulated/float32" if group.startswith("emulation-") else
                    "refnet/floor" if group.startswith(FLOOR) else
                    "time/60 s target" if group.startswith("study-") else "refnet/torch")
            line = f"{group:<36} {ratio:>10.3g}  ({kind})"
            if group.startswith(FLOOR) and group[len(FLOOR):] in result:
                line += f"; floor/torch {result[group[len(FLOOR):]] / ratio:.3g}"
            extra = extras.get(group, {})
            for key, name in PAIRED.items():
                if key in extra:
                    line += f"; {name} {extra[key]:.3g} in interleaved pairs"
            if "speedup_over_mpmath" in extra:
                line += f"; {extra['speedup_over_mpmath']:.3g}x the mpmath path"
            if "peak_rss_mib" in extra:
                line += f"; peak RSS {extra['peak_rss_mib']:.0f} MiB"
            print(line)
    return 0


def extra_info(run: dict) -> dict:
    """group -> the refnet benchmark's extra_info."""
    out = {}
    for bench in run["benchmarks"]:
        impl = bench.get("params", {}).get("impl") if bench.get("params") else None
        if (impl or "refnet") == "refnet":
            out[bench["group"]] = bench.get("extra_info", {})
    return out


if __name__ == "__main__":
    sys.exit(main())
