#!/bin/sh
# tools/golden.sh BINDIR OUTFILE - merges every example recipe with several option sets
# and prints sha256 of every output file (plan output too). Used to check that a
# refactor changes no byte: run it with the old and the new build and diff the two files.
set -eu
export SOURCE_DATE_EPOCH=0 # tar members otherwise carry the current time
bin=$(cd "$1" && pwd); outf=$2
case $outf in /*) ;; *) outf=$(pwd)/$outf ;; esac
root=$(cd "$(dirname "$0")/.." && pwd)
w=$(mktemp -d /tmp/gold.XXXXXX)
mkdir -p $w/demo
mk=$bin/ms-mkmodel
$mk --layers 4 --hidden 64 --intermediate 176 --vocab 256 --dtype bf16 --seed 1 $w/demo/base >/dev/null
for i in 1 2 3 4; do $mk --base $w/demo/base --noise 0.002 --seed $((100 + i)) $w/demo/ft$i >/dev/null; done
cd $w
: > $outf
for r in $root/recipes/examples/*.yml; do
  n=$(basename $r .yml)
  for opts in "-j1" "-j2 --max-memory 8M" "--out-shard-size 20K --random-seed 7" "--compress zstd:3" ; do
    rm -rf out; $bin/mergestream merge $r out -q $opts >/dev/null 2>&1 || echo "FAIL $n $opts" >> $outf
    (cd out && find . -type f | sort | xargs sha256sum) | sed "s|^|$n [$opts] |" >> $outf
  done
  $bin/mergestream merge $r - -q 2>/dev/null | sha256sum | sed "s|^|$n [tar] |" >> $outf
  $bin/mergestream merge $r out1m -q --max-memory 1M 2>&1 | sha256sum | sed "s|^|$n [1M] |" >> $outf
  $bin/mergestream plan $r 2>&1 | sed "s|$w|TMP|g; s|$root|ROOT|g" | sha256sum | sed "s|^|$n [plan] |" >> $outf
  for dt in float32 float16; do
    sed "s/^dtype:.*//" $r > r2.yml; echo "dtype: $dt" >> r2.yml
    rm -rf out; $bin/mergestream merge r2.yml out -q >/dev/null 2>&1 || echo "FAIL $n dtype $dt" >> $outf
    (cd out && find . -type f -name '*.safetensors' | sort | xargs sha256sum 2>/dev/null) | sed "s|^|$n [$dt] |" >> $outf
  done
done
$bin/mergestream merge --help 2>&1 | sha256sum | sed 's/^/help /' >> $outf
cd /; rm -rf $w
