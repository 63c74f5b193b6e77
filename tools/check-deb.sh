#!/bin/sh
# tools/check-deb.sh - `make check-deb`: builds the Debian package with
# `dpkg-buildpackage -us -uc -b` from a copy of the tree (this tree, its build/
# and its parent directory stay untouched), checks what the .deb holds, installs it
# with dpkg -i, runs the installed `mergestream --version` from PATH, and removes
# the package again unless it was installed before. Installing needs root; as
# another user the package is built and checked but not installed.
set -eu
src=$(cd "$(dirname "$0")/.." && pwd)
tmp=$(mktemp -d "${TMPDIR:-/tmp}/msdeb.XXXXXX")
trap 'rm -rf "$tmp"' EXIT INT TERM
say() { echo "check-deb: $*"; }
fail() { echo "check-deb: FAIL: $*" >&2; exit 1; }

version=$(sed -n 's/^#define MS_VERSION "\(.*\)"/\1/p' "$src/include/ms_common.h")
changelog=$(sed -n '1s/^mergestream (\([^)]*\)).*/\1/p' "$src/debian/changelog")
[ "$version" = "$changelog" ] || fail "MS_VERSION $version but debian/changelog says $changelog"

# The tracked files plus the uncommitted ones, without build/ or other products.
mkdir "$tmp/mergestream-$version"
if git -C "$src" rev-parse --git-dir >/dev/null 2>&1; then
    (cd "$src" && git ls-files -z --cached --others --exclude-standard) |
        (cd "$src" && xargs -0 cp --parents -t "$tmp/mergestream-$version" 2>/dev/null) || true
else
    (cd "$src" && tar --exclude=./build -cf - .) | tar -xf - -C "$tmp/mergestream-$version"
fi
[ -f "$tmp/mergestream-$version/debian/control" ] || fail "copy of the tree has no debian/control"
rm -rf "$tmp/mergestream-$version/build"

say "dpkg-buildpackage -us -uc -b in $tmp/mergestream-$version"
# Two jobs, no -dbgsym package: a quick build (the test suite runs in make check).
if ! (cd "$tmp/mergestream-$version" &&
      DEB_BUILD_OPTIONS="parallel=2 noautodbgsym ${DEB_BUILD_OPTIONS:-}" dpkg-buildpackage -us -uc -b) \
        > "$tmp/build.log" 2>&1; then
    tail -30 "$tmp/build.log"
    fail "dpkg-buildpackage failed"
fi
deb=$(ls "$tmp"/mergestream_"$version"_*.deb 2>/dev/null | head -1)
[ -n "$deb" ] || fail "no .deb produced"
say "built $(basename "$deb") ($(wc -c < "$deb") bytes)"

dpkg-deb -c "$deb" > "$tmp/contents"
for f in ./usr/bin/mergestream ./usr/share/man/man1/mergestream.1.gz \
         ./usr/share/bash-completion/completions/mergestream \
         ./usr/share/zsh/vendor-completions/_mergestream ./usr/share/doc/mergestream/copyright; do
    grep -q " $f\$" "$tmp/contents" || fail "$f missing from the package"
done
deps=$(dpkg-deb -f "$deb" Depends)
for lib in libuv1 libzstd1 libyaml-0-2 libjansson4 libsentencepiece0; do
    case $deps in *"$lib"*) ;; *) fail "Depends lacks $lib: $deps" ;; esac
done
say "contents and Depends ok: $deps"

if [ "$(id -u)" != 0 ]; then
    say "not root: the package is not installed (dpkg -i needs root)"
    exit 0
fi
had=$(dpkg-query -W -f '${Status}' mergestream 2>/dev/null || true)
dpkg -i "$deb" > "$tmp/install.log" 2>&1 || { cat "$tmp/install.log"; fail "dpkg -i failed"; }
got=$(cd / && env PATH=/usr/bin:/bin mergestream --version) || fail "installed mergestream failed"
[ "$got" = "mergestream $version" ] || fail "installed mergestream --version says '$got'"
say "installed; from PATH: $(command -v mergestream 2>/dev/null || echo /usr/bin/mergestream): $got"
man -l /usr/share/man/man1/mergestream.1.gz 2>/dev/null | grep -q "mergestream - merge" ||
    fail "installed man page does not render"
case $had in
*"install ok installed"*) say "mergestream was installed before: left installed" ;;
*) dpkg -r mergestream > /dev/null 2>&1 || fail "dpkg -r mergestream failed"
   say "removed again (dpkg -r)" ;;
esac
say "ok"
