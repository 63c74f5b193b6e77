#!/bin/sh
# tests/tsan.sh BUILD - the engine and the output sinks under ThreadSanitizer,
# through the command line (Criterion's runner does not start under TSan: it
# crashes in libcriterion before any test runs). BUILD is a SANITIZE=thread build
# (make check-tsan builds build/tsan). Merges every example recipe at 1 and 2
# threads with small chunks, and a few with zstd, tar and --pipe outputs and
# zstd-compressed inputs; fails on any "WARNING: ThreadSanitizer" report, on a
# failed merge, and when 1 and 2 threads give different bytes.
set -u
build=$(cd "${1:-build/tsan}" && pwd)
src=$(pwd)
ms="$build/mergestream"
mk="$build/ms-mkmodel"
for b in "$ms" "$mk"; do
    [ -x "$b" ] || { echo "tsan: $b not found (make SANITIZE=thread BUILD=build/tsan all)"; exit 1; }
done
work=$(mktemp -d "${TMPDIR:-/tmp}/ms-tsan.XXXXXX")
trap 'rm -rf "$work"' EXIT INT TERM
export TSAN_OPTIONS="halt_on_error=0 second_deadlock_stack=1 ${TSAN_OPTIONS:-}"
cd "$work" && mkdir demo || exit 1
"$mk" --layers 4 --hidden 64 --intermediate 176 --vocab 256 --dtype bf16 --seed 1 demo/base >/dev/null || exit 1
for i in 1 2 3 4; do
    "$mk" --base demo/base --noise 0.002 --seed $((100 + i)) demo/ft$i >/dev/null
done
runs=0 fails=0
# run NAME ARGS...: one merge; its stderr is kept in log.NAME
run() {
    name=$1; shift
    runs=$((runs + 1))
    if ! "$ms" merge -q "$@" 2>"log.$name"; then
        echo "tsan: $name: merge failed: $(grep -v '^$' "log.$name" | head -3)"
        fails=$((fails + 1))
    fi
    if grep -q 'WARNING: ThreadSanitizer' "log.$name"; then
        echo "tsan: $name: ThreadSanitizer report:"
        grep -A12 'WARNING: ThreadSanitizer' "log.$name" | head -40
        fails=$((fails + 1))
    fi
}
# same A B: the shards, index and config.json of two outputs are equal (README.md
# names the output directory)
same() {
    for f in "$1"/*.safetensors* "$1"/*.json; do
        if ! cmp -s "$f" "$2/$(basename "$f")"; then
            echo "tsan: $f and $2/$(basename "$f") differ"
            fails=$((fails + 1))
        fi
    done
}
for r in "$src"/recipes/examples/*.yml; do
    n=$(basename "$r" .yml)
    run "$n-1" "$r" "o1-$n" -j 1 --chunk-elems 2048
    run "$n-2" "$r" "o2-$n" -j 2 --chunk-elems 2048 --max-memory 8M
    same "o1-$n" "o2-$n"
done
for n in linear ties; do
    r="$src/recipes/examples/$n.yml"
    run "$n-zstd" "$r" "oz-$n" -j 2 --compress zstd --chunk-elems 4096
    run "$n-tar" "$r" - -j 2 --chunk-elems 4096 >"$n.tar"
    mkdir -p "ot-$n" && tar -xf "$n.tar" -C "ot-$n" && same "o1-$n" "ot-$n"
    mkdir -p "op-$n"
    run "$n-pipe" "$r" x -j 2 --chunk-elems 4096 --pipe "cat >'$work/op-$n/{}'"
    same "o1-$n" "op-$n"
done
# zstd-compressed inputs: the same bytes as the plain ones
mkdir -p zin/demo
cp -r demo/base demo/ft1 demo/ft2 demo/ft3 demo/ft4 zin/demo/
for d in zin/demo/*; do zstd -q --rm "$d/model.safetensors"; done
(cd zin && run zin "$src/recipes/examples/ties.yml" "../oi-ties" -j 2 --chunk-elems 4096)
same o1-ties oi-ties
echo "tsan: $runs merges, $fails problems"
[ "$fails" -eq 0 ]
