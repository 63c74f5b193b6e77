#!/bin/sh
# tests/fuzz/run.sh [SECONDS] - builds the libFuzzer harnesses with clang
# (ASan + UBSan) from the library sources they need, replays the regression
# inputs in tests/fuzz/regress/<harness>/, then fuzzes each harness for SECONDS
# (default 60) from a seed corpus generated into a temporary directory: small
# valid safetensors files and the recipes in recipes/examples/. No blobs are
# committed besides crash reproducers kept under regress/.
#
# Crashes are written to build/fuzz/artifacts/; the script exits non-zero if a
# regression input or a fuzz run fails. FUZZ_JOBS=N runs N harnesses at once
# (default 1: one core per harness, the other free).
set -eu
cd "$(dirname "$0")/../.."
secs=${1:-60}
[ -n "$secs" ] || secs=60
CLANG=${CLANG:-clang}
out=build/fuzz
mkdir -p "$out/artifacts"

command -v "$CLANG" >/dev/null 2>&1 || { echo "fuzz: $CLANG not found (make deps installs clang)"; exit 1; }

cflags="-std=c11 -D_POSIX_C_SOURCE=200809L -D_DEFAULT_SOURCE -g -O1 -Iinclude
 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer"

# Library sources and packages each harness needs (compiled with clang here; the
# Makefile's objects are gcc-built and not instrumented). base/ depends on nothing
# but libc, so a harness takes it whole plus the one folder it tests.
st_srcs="io/st_read.c io/st_write.c io/st_remote.c io/http.c io/zsrc.c io/json_alloc.c base/*.c"
st_pkgs="libzstd jansson libcurl libuv"
recipe_srcs="pipeline/recipe.c base/*.c"
recipe_pkgs="yaml-0.1"

build() { # name "packages" sources...
    name=$1 pkgs=$2; shift 2
    echo "fuzz: building $out/$name"
    # shellcheck disable=SC2086
    $CLANG $cflags $(pkg-config --cflags $pkgs) -o "$out/$name" "tests/fuzz/$name.c" "$@" \
        $(pkg-config --libs $pkgs) -lm -lpthread
}
build fuzz_st_header "$st_pkgs" $st_srcs
build fuzz_recipe "$recipe_pkgs" $recipe_srcs

seeds=$(mktemp -d "${TMPDIR:-/tmp}/msfuzz.XXXXXX")
trap 'rm -rf "$seeds"' EXIT INT TERM

# --- seeds: safetensors files (8-byte little-endian length, JSON, data)
mkst() { # file json databytes
    f=$1 json=$2 nbytes=$3
    n=${#json}
    le=""
    i=0
    while [ $i -lt 8 ]; do
        le="$le$(printf '\\%03o' $((n % 256)))"
        n=$((n / 256)); i=$((i + 1))
    done
    # shellcheck disable=SC2059
    { printf "$le"; printf '%s' "$json"; head -c "$nbytes" /dev/zero; } >"$f"
}
mkdir -p "$seeds/st" "$seeds/recipe"
mkst "$seeds/st/one" '{"__metadata__":{"format":"pt"},"w":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}}' 16
mkst "$seeds/st/two" '{"a.weight":{"dtype":"BF16","shape":[3],"data_offsets":[0,6]},"b":{"dtype":"F16","shape":[1,2],"data_offsets":[6,10]}}  ' 10
mkst "$seeds/st/odd" '{"e":{"dtype":"F32","shape":[0,4],"data_offsets":[0,0]},"s":{"dtype":"I64","shape":[],"data_offsets":[0,8]},"f4":{"dtype":"F4","shape":[4],"data_offsets":[8,10]}}' 10
mkst "$seeds/st/empty" '{}' 0
mkst "$seeds/st/meta" '{"__metadata__":{"format":"pt","x":"y"},"m.layers.0.x":{"dtype":"F8_E4M3","shape":[2],"data_offsets":[0,2]},"u":{"dtype":"BOOL","shape":[1],"data_offsets":[2,3]}}' 3
cp recipes/examples/*.yml "$seeds/recipe/"
printf 'slices:\n  - sources:\n      - model: a\n        layer_range: [0, 2]\n      - model: b\n        layer_range: [0, 2]\nmerge_method: slerp\nbase_model: a\nparameters:\n  t:\n    - filter: self_attn\n      value: [0, 0.5, 1]\n    - value: 0.5\ndtype: bfloat16\n' >"$seeds/recipe/slices.yml"

fail=0
# --- regression inputs
for name in fuzz_st_header fuzz_recipe; do
    d=tests/fuzz/regress/$name
    if [ -d "$d" ] && [ -n "$(ls -A "$d" 2>/dev/null)" ]; then
        echo "fuzz: replaying $d"
        "$out/$name" -close_fd_mask=2 "$d"/* >"$out/$name.regress.log" 2>&1 || {
            echo "fuzz: $name fails on a regression input:"; tail -30 "$out/$name.regress.log"; fail=1; }
    fi
done

# --- fuzzing
run() { # name corpus maxlen
    name=$1 corpus=$2 maxlen=$3
    mkdir -p "$seeds/work-$name"
    echo "fuzz: $name for ${secs}s: $out/$name -max_total_time=$secs -max_len=$maxlen -timeout=10 -rss_limit_mb=2048 -close_fd_mask=2 $seeds/work-$name $corpus"
    if "$out/$name" -max_total_time="$secs" -max_len="$maxlen" -timeout=10 -rss_limit_mb=2048 \
            -close_fd_mask=2 -print_final_stats=1 -artifact_prefix="$out/artifacts/$name-" \
            "$seeds/work-$name" "$corpus" >"$out/$name.log" 2>&1; then
        grep -E '^(Done|stat::number_of_executed_units|stat::new_units_added)' "$out/$name.log" | tr '\n' ' '
        echo
    else
        echo "fuzz: $name FAILED (log $out/$name.log, reproducer in $out/artifacts/):"
        grep -E 'ERROR|SUMMARY|runtime error|Test unit written' "$out/$name.log" | head -10
        fail=1
    fi
}
if [ "${FUZZ_JOBS:-1}" -gt 1 ]; then
    run fuzz_st_header "$seeds/st" 4096 &
    run fuzz_recipe "$seeds/recipe" 8192 &
    wait
else
    run fuzz_st_header "$seeds/st" 4096
    run fuzz_recipe "$seeds/recipe" 8192
fi
[ $fail -eq 0 ] && echo "fuzz: ok" || echo "fuzz: failures above"
exit $fail
