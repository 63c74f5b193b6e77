#!/bin/sh
# tools/check-layers.sh BUILD - checks the folder dependency graph (docs/ARCHITECTURE.md):
#
#     tools -> pipeline -> {io, stages} -> base
#
# 1. Link level (nm): no object of a folder references a symbol defined in a
#    folder it may not depend on, and base/ and stages/ reference no libuv,
#    jansson, zstd, libyaml, libcurl or libsentencepiece symbol (io/ may use libuv,
#    jansson, zstd, libcurl and libsentencepiece, the last from io/spm.cc only;
#    pipeline/ no libcurl and no libsentencepiece).
# 2. Source level: the same rule for #include of uv.h, jansson.h, zstd.h, yaml.h,
#    curl/curl.h and sentencepiece_processor.h.
# 3. Methods: no merge-method name appears as a string literal outside stages/
#    (a method's rules live in its own file; the names come from the registry
#    through `mergestream merge --help`).
# Prints one line per violation and exits 1 if there is any.
set -eu
build=${1:-build}
obj=$build/obj
[ -d "$obj/base" ] || { echo "check-layers: $obj/base not built (run make first)" >&2; exit 1; }
tmp=$(mktemp -d "${TMPDIR:-/tmp}/mslayers.XXXXXX")
trap 'rm -rf "$tmp"' EXIT INT TERM
bad=0

objects() { # folder -> its objects whose source (.c, or .cc) still exists (a stale build may hold others)
    for o in "$obj/$1"/*.o; do
        b=$1/$(basename "$o" .o)
        [ -f "$b.c" ] || [ -f "$b.cc" ] && echo "$o"
    done
    return 0
}
source_of() { # object -> its source file's name
    b=$(basename "$(dirname "$1")")/$(basename "$1" .o)
    if [ -f "$b.cc" ]; then echo "$b.cc"; else echo "$b.c"; fi
}
defined() { # folder -> global symbols its objects define
    objects "$1" | xargs -r nm --defined-only 2>/dev/null | awk '$2 ~ /^[TDBRVWC]$/ { print $3 }' |
        sort -u
}
for d in base io stages pipeline; do defined $d > "$tmp/def.$d"; done

# forbidden FOLDER LIST-OF-FOLDERS-IT-MAY-NOT-USE LIB-SYMBOL-REGEX
forbidden() {
    d=$1; shift
    regex=$1; shift
    for o in $(objects "$d"); do
        nm -u "$o" | awk '{ print $2 }' | sort -u > "$tmp/und"
        for up in "$@"; do
            comm -12 "$tmp/und" "$tmp/def.$up" | while read -r sym; do
                echo "check-layers: $(source_of "$o") uses $sym from $up/"
            done
        done
        if [ -n "$regex" ]; then
            grep -E "$regex" "$tmp/und" | while read -r sym; do
                echo "check-layers: $(source_of "$o") uses library symbol $sym"
            done
        fi
    done
}
# libsentencepiece's symbols are C++ ones: mangled names in its namespace.
spm='_ZN?K?13sentencepiece'
{
    forbidden base "^(uv_|json_|ZSTD_|yaml_|curl_)|$spm" io stages pipeline
    forbidden stages "^(uv_|json_|ZSTD_|yaml_|curl_)|$spm" io pipeline
    forbidden io '^yaml_' stages pipeline
    forbidden pipeline "^curl_|$spm"
} > "$tmp/nm.out"

# Includes: folder -> headers it may not include.
for spec in 'base:uv.h|jansson.h|zstd.h|yaml.h|curl/curl.h|sentencepiece_processor.h' \
            'stages:uv.h|jansson.h|zstd.h|yaml.h|curl/curl.h|sentencepiece_processor.h' \
            'io:yaml.h' 'pipeline:curl/curl.h|sentencepiece_processor.h'; do
    d=${spec%%:*}; h=${spec#*:}
    grep -nE "^#include <($h)>" "$d"/*.c "$d"/*.cc "$d"/*.h 2>/dev/null |
        sed "s/^/check-layers: forbidden include: /" >> "$tmp/nm.out" || true
done

# Method names as string literals outside stages/.
"$build/mergestream" merge --help 2>/dev/null |
    sed -n '/^merge methods/,$ s/^  \([a-z_][a-z0-9_]*\)  .*/\1/p' > "$tmp/methods"
[ -s "$tmp/methods" ] || echo "check-layers: no method names from $build/mergestream merge --help" >> "$tmp/nm.out"
pat=$(paste -sd'|' "$tmp/methods")
grep -nE "\"($pat)\"" base/*.c io/*.c io/*.cc pipeline/*.c tools/*.c include/*.h 2>/dev/null |
    sed 's/^/check-layers: method name outside stages\/: /' >> "$tmp/nm.out" || true

if [ -s "$tmp/nm.out" ]; then
    cat "$tmp/nm.out"
    bad=1
fi
n=$(wc -l < "$tmp/methods")
[ $bad -eq 0 ] && echo "check-layers: ok (tools -> pipeline -> {io, stages} -> base; $n method names only in stages/)"
exit $bad
