#!/usr/bin/env bash
# The main job for now: start a local cluster, store a file, read it back,
# check the cluster's health, stop the cluster.
set -euo pipefail
cd "$(dirname "$0")/.."
Q=${QUERN:-./target/release/quern}
[ -x "$Q" ] || { echo "build first: cargo build --release" >&2; exit 1; }
work=$(mktemp -d)
trap '"$Q" cluster down --dir "$work/cluster" >/dev/null 2>&1 || true; rm -rf "$work"' EXIT

"$Q" cluster up --dir "$work/cluster" --datanodes 3
export QUERN_CONFIG="$work/cluster/client.toml"
head -c $((96 * 1024 * 1024)) /dev/urandom > "$work/sample.bin"
"$Q" mkdir -p /demo
"$Q" put "$work/sample.bin" /demo/sample.bin --chunk-size 32MiB
"$Q" ls -l /demo
"$Q" locate /demo/sample.bin
"$Q" get /demo/sample.bin "$work/back.bin"
cmp "$work/sample.bin" "$work/back.bin" && echo "read back: identical ($(stat -c %s "$work/back.bin") bytes)"
"$Q" fsck /
"$Q" report
