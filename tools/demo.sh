#!/bin/sh
# tools/demo.sh BUILD - the README's first command (`make demo`): generates the
# small example models, merges them with every recipe in recipes/examples/ and
# checks each output with `mergestream verify`.
set -eu
build=${1:-build}
root=$(pwd)
sh tools/demo-models.sh "$build"
cd "$build"
for r in "$root"/recipes/examples/*.yml; do
    name=$(basename "$r" .yml)
    out=demo/out-$name
    rm -rf "$out"
    ./mergestream merge "$r" "$out" -q
    ./mergestream verify "$out"
done
echo "demo: outputs are in $build/demo/out-*; try: $build/mergestream inspect $build/demo/out-linear"
