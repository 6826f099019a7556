#!/usr/bin/env bash
# The device check of the kernels modelled from ATen's sources only (spec/precision.md, "The
# kernel audit" and "How to check on a GPU"): the half losses other than cross-entropy, the
# adaptive average pool's backward and BatchNorm's native (bf16) backward. One short run on one
# CUDA GPU with torch installed: every case is a capture (torch on the GPU) and a diagnose
# --compare (the emulation against it); about 2 minutes, most of it importing torch.
#
#   bash spec/gpu-check-kernels.sh [OUTDIR]   (default gpu-check; PYTHON=..., DEVICE=cpu for a
#                                             dry run on torch's CPU kernels, which are not CUDA's)
#
# Writes OUTDIR/<case>.npz (the GPU's gradients), OUTDIR/<case>.json (diagnose --json, with
# "compare": per tensor the fraction bit for bit equal, the largest difference in ulps, the
# first difference) and prints one line per case and tensor. Nothing here needs network access.
set -u
OUT=${1:-gpu-check}
PY=${PYTHON:-python}
mkdir -p "$OUT/specs"

"$PY" - "$OUT/specs" <<'EOF'
import json, sys
out = sys.argv[1]
mlp = lambda loss, final: {"input_shape": [32], "seed": 0, "batch": 64, "loss": loss,
                           "layers": [{"type": "dense", "out": 64}, {"type": "tanh"},
                                      {"type": "dense", "out": 64}, {"type": "sigmoid"},
                                      {"type": "dense", "out": final}]}
specs = {
    "mse": mlp({"type": "mse"}, 8),
    "mse-sum": mlp({"type": "mse", "reduction": "sum"}, 8),
    "l1": mlp({"type": "l1"}, 8),
    "smooth-l1": mlp({"type": "smooth_l1", "beta": 0.5}, 8),
    "huber": mlp({"type": "huber", "delta": 0.7}, 8),
    "bce": mlp({"type": "bce_with_logits"}, 8),
    "bce-pos": mlp({"type": "bce_with_logits", "pos_weight": [2.0] * 8}, 8),
    # adaptive average pooling with overlapping windows (7 -> 3: windows of 3, 3 and 3 that
    # share a row and a column), then a dense head
    "adaptive-pool": {"input_shape": [3, 7, 7], "seed": 0, "batch": 16,
                      "loss": {"type": "softmax_cross_entropy"},
                      "layers": [{"type": "conv2d", "out_channels": 8, "kernel_size": 3,
                                  "padding": 1},
                                 {"type": "adaptive_avgpool2d", "output_size": 3},
                                 {"type": "flatten"}, {"type": "dense", "out": 10}]},
    # BatchNorm on a 2-D input (the channels-last kernels) and on a 4-D one (the fused kernel)
    "bn-mlp": {"input_shape": [32], "seed": 0, "batch": 64,
               "loss": {"type": "softmax_cross_entropy"},
               "layers": [{"type": "dense", "out": 64}, {"type": "batchnorm"}, {"type": "relu"},
                          {"type": "dense", "out": 10}]},
}
for name, spec in specs.items():
    with open(f"{out}/{name}.json", "w") as f:
        json.dump(spec, f)
EOF

run_case() {   # name, spec argument(s), then the policy options shared by both commands
    local name=$1 model=$2; shift 2
    "$PY" -m refnet capture $model "$@" --device "${DEVICE:-cuda}" --out "$OUT/$name.npz" > /dev/null \
        && "$PY" -m refnet diagnose $model "$@" --compare "$OUT/$name.npz" --json \
           > "$OUT/$name.json"
    [ -s "$OUT/$name.json" ] || echo "$name: FAILED (capture or diagnose)"
}

for fmt in fp16 bf16; do
    for loss in mse mse-sum l1 smooth-l1 huber bce bce-pos; do
        run_case "$loss-$fmt-half" "$OUT/specs/$loss.json" --precision $fmt --policy half
    done
    run_case "mse-$fmt-half-256" "$OUT/specs/mse.json" --precision $fmt --policy half \
        --loss-scale 256
    for policy in half autocast; do
        run_case "adaptive-pool-$fmt-$policy" "$OUT/specs/adaptive-pool.json" --precision $fmt \
            --policy $policy
        run_case "bn-mlp-$fmt-$policy" "$OUT/specs/bn-mlp.json" --precision $fmt --policy $policy
        run_case "cnn-bn-$fmt-$policy" "--preset cnn-bn" --precision $fmt --policy $policy
    done
done

"$PY" - "$OUT" <<'EOF'
import glob, json, os, sys
for path in sorted(glob.glob(os.path.join(sys.argv[1], "*.json"))):
    try:
        rows = json.load(open(path)).get("compare") or []
    except (OSError, ValueError):
        continue
    for row in rows:
        print(f"{os.path.basename(path)[:-5]:28s} {row['name']:22s} "
              f"equal {row['equal_fraction']:.4f}  max_ulps {row['max_ulps']}  "
              f"nonfinite_mismatch {row['nonfinite_mismatch']}  off_grid {row['off_grid']}")
EOF
