#!/usr/bin/env bash
# resnet_mini, one epoch on Fashion-MNIST with the settings its .keras file
# was compiled with (SGD 0.01, momentum 0.9, sparse cross-entropy, batch
# 100), in quern (3 datanodes) and in Keras, for several seeds; prints one
# JSON line per run. Both start from the weights stored in the .keras file
# and scale pixels per feature to [0, 1] (quern's --scale minmax, Keras with
# SCALE=minmax); a seed changes only the order the examples are seen in.
# With SHUFFLE=0 both take the examples in stored order on one datanode
# (quern --no-shuffle, Keras shuffle=False), so both see the same batches:
# what is left between them is floating-point rounding.
#
#   PY=venv/bin/python SEEDS="1 2 3 4 5" scripts/resnet_mini_accuracy.sh
#   PY=venv/bin/python SEEDS=1 SHUFFLE=0 scripts/resnet_mini_accuracy.sh
set -euo pipefail
cd "$(dirname "$0")/.."
Q=${QUERN:-./target/release/quern}
PY=${PY:-python3}
SEEDS=${SEEDS:-"1 2 3 4 5"}
SHUFFLE=${SHUFFLE:-1}
nodes=3 order=()
[ "$SHUFFLE" = 0 ] && nodes=1 order=(--no-shuffle)
F=/usr/share/datasets/fashion-mnist
[ -x "$Q" ] || { echo "build first: cargo build --release" >&2; exit 1; }
[ -d "$F" ] || { echo "apt-get install dataset-fashion-mnist" >&2; exit 1; }
work=$(mktemp -d)
trap '"$Q" cluster down --dir "$work/cluster" >/dev/null 2>&1 || true; rm -rf "$work"' EXIT

"$Q" cluster up --dir "$work/cluster" --datanodes $nodes >/dev/null
export QUERN_CONFIG="$work/cluster/client.toml"
"$Q" dataset import idx --images $F/train-images-idx3-ubyte.gz \
    --labels $F/train-labels-idx1-ubyte.gz /fashion/train >/dev/null
"$Q" dataset import idx --images $F/t10k-images-idx3-ubyte.gz \
    --labels $F/t10k-labels-idx1-ubyte.gz /fashion/test >/dev/null
"$Q" dataset stats /fashion/train >/dev/null
for seed in $SEEDS; do
    start=$(date +%s%N)
    "$Q" train --model tests/fixtures/keras/resnet_mini.keras --data /fashion/train \
        --epochs 1 --batch-size 100 --seed "$seed" --display 0 "${order[@]}" \
        --out "/models/r$seed" >/dev/null 2>"$work/train.log" \
        || { cat "$work/train.log" >&2; exit 1; }
    ms=$(( ($(date +%s%N) - start) / 1000000 ))
    acc=$("$Q" score --model "/models/r$seed" --data /fashion/test --json \
        | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["accuracy"])')
    echo "{\"system\": \"quern\", \"seed\": $seed, \"test_accuracy\": $acc, \"seconds\": $((ms / 1000)).$(printf %03d $((ms % 1000)))}"
    SEED=$seed SCALE=minmax SHUFFLE=$SHUFFLE "$PY" scripts/keras_side_by_side.py resnet_mini \
        | "$PY" -c 'import json,sys; r=json.loads(sys.stdin.read().strip().splitlines()[-1]); print(json.dumps({"system": "keras", "seed": r["seed"], "test_accuracy": r["test_accuracy"], "seconds": r["epoch_seconds"]}))'
done
