#!/bin/sh
# tools/demo-models.sh BUILD - generates the small models that the recipes in
# recipes/examples/ name: BUILD/demo/base (a synthetic Llama-like model: 4
# layers, hidden 64, intermediate 176, vocabulary 256, bf16) and four noisy
# fine-tunes of it, BUILD/demo/ft1 .. ft4. The recipes name them relative to
# BUILD (demo/base), the directory the demo runs from.
set -eu
build=${1:-build}
mk="$build/ms-mkmodel"
if [ ! -x "$mk" ]; then
    echo "demo-models: $mk not found (run make first)" >&2
    exit 1
fi
out="$build/demo"
mkdir -p "$out"
rm -rf "$out/base" "$out/ft1" "$out/ft2" "$out/ft3" "$out/ft4"
"$mk" --layers 4 --hidden 64 --intermediate 176 --vocab 256 --dtype bf16 --seed 1 "$out/base"
for i in 1 2 3 4; do
    "$mk" --base "$out/base" --noise 0.002 --seed $((100 + i)) "$out/ft$i"
done
echo "demo-models: wrote $out/base and $out/ft1 .. $out/ft4"
