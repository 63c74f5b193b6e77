#!/bin/sh
# Runs every Criterion test binary given, then prints one closing line
# "tests: N passed, M failed" over all of them. Exit status 1 if any failed.
build=$1; shift
total_pass=0; total_fail=0; failed_bins=""
# Under the sanitizers, one worker at a time: Criterion's runner leaks a 48-byte
# block of its own when it runs workers in parallel, and LeakSanitizer would fail
# the binary for it (a suppression on libcriterion would hide our leaks too).
jobs=2
case $build in */san) jobs=1 ;; esac
for t in "$@"; do
    out=$("$t" --jobs=$jobs 2>&1); rc=$?
    line=$(printf '%s\n' "$out" | grep 'Synthesis:' | tail -1)
    printf '%s\n' "$out" | grep -E '\[(FAIL|----)\]|CRASH|ERROR|Assertion|runtime error|AddressSanitizer' | head -40
    p=$(printf '%s' "$line" | sed -n 's/.*Passing: \([0-9]*\).*/\1/p')
    f=$(printf '%s' "$line" | sed -n 's/.*Failing: \([0-9]*\).*/\1/p')
    c=$(printf '%s' "$line" | sed -n 's/.*Crashing: \([0-9]*\).*/\1/p')
    p=${p:-0}; f=${f:-0}; c=${c:-0}
    if [ "$rc" -ne 0 ] && [ "$f" -eq 0 ] && [ "$c" -eq 0 ]; then f=1; fi
    printf '%-40s %s\n' "$(basename "$t")" "${line:-no synthesis line (exit $rc)}"
    total_pass=$((total_pass + p)); total_fail=$((total_fail + f + c))
    [ "$rc" -ne 0 ] && failed_bins="$failed_bins $(basename "$t")"
done
[ -n "$failed_bins" ] && echo "failed:$failed_bins"
echo "tests: $total_pass passed, $total_fail failed"
[ "$total_fail" -eq 0 ] && [ -z "$failed_bins" ]
