"""The 50-digit gradient against the float64 gradient of the same net, in one run (issue 14).

    python benchmarks/mp_ratio.py [--rounds 3] [--bigint] [--profile]

For the two issue-14 nets in benchmarks/models/ (the ReLU MLP 784-256-256-10 at batch 32 and
LeNet-5 at batch 8) it times loss + all gradients in float64 and in the mp backend at 50 digits
(engine "ozaki"; with --bigint also the big-integer reference engine), best of --rounds, and
prints the ratios. Timings only: no assertion. --profile prints the cProfile top of one mp run.
"""

import argparse
import cProfile
import pstats
import time
from pathlib import Path

from refnet import FLOAT64, Model, MPBackend

MODELS = Path(__file__).resolve().parent / "models"


def best_of(fn, rounds):
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--bigint", action="store_true", help="also time the reference engine")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("models", nargs="*", default=["mlp-784-256-256-10", "lenet5"])
    args = parser.parse_args()
    for name in args.models:
        model = Model.load(MODELS / f"{name}.json")
        params, x, y = model.prepare()
        t64 = best_of(lambda: model.loss_and_grads(FLOAT64, params, x, y), 20 * args.rounds)
        mp = MPBackend(50)
        tmp = best_of(lambda: model.loss_and_grads(mp, params, x, y), args.rounds)
        line = f"{name}: float64 {t64 * 1e3:.2f} ms, mp50 ozaki {tmp * 1e3:.0f} ms ({tmp / t64:.0f}x)"
        if args.bigint:
            ref = MPBackend(50, engine="bigint")
            tref = best_of(lambda: model.loss_and_grads(ref, params, x, y), 1)
            line += f", mp50 bigint {tref * 1e3:.0f} ms ({tref / t64:.0f}x; ozaki {tref / tmp:.1f}x faster)"
        print(line, flush=True)
        if args.profile:
            prof = cProfile.Profile()
            prof.runcall(model.loss_and_grads, mp, params, x, y)
            pstats.Stats(prof).sort_stats("tottime").print_stats(15)


if __name__ == "__main__":
    main()
