#!/bin/sh
# tools/bench.sh BUILD [scenario...] - the merge benchmark (not a test).
#
# Each scenario generates synthetic bf16 models, warms the page cache, measures
# the I/O floor (ms-iofloor: read every input byte and write as many output
# bytes, no merge, same files, in blocks of BENCH_BLOCK bytes: default 1065152,
# the merge's read per input for three bf16 models at 512M), runs the merge under
# ms-timeit (wall time and peak RSS of the process), and prints both from the
# same run. Floor and merge are each the best (shortest) of BENCH_REPEAT runs
# (default 3; floor and merge alternate), so one slow run under load does not
# set the ratio; their CPU seconds (user + system, also best of the runs) follow,
# with the CPU ratio:
#
#   scenario  size/model  wall_s  floor_s  ratio  MB/s  maxrss_MiB  budget_MiB  cpu_s  floor_cpu_s  cpu_ratio
#
# A fair floor (warm cache): before every floor the previous merge's output and
# floor file are deleted, so floor and merge start from the same tmpfs/page-cache
# state, and one warm-up floor per scenario is run and discarded (the first read
# after `cat` moves the inputs' pages to the active LRU list, and the first run
# after the previous scenario's rm pays for the freed pages). The floor is one
# thread running ~0.3-0.5 s, mostly in the kernel: its wall time is whatever the
# scheduler gives it (on the 2-core shared machine, 0.2 to 0.6 s for the same
# bytes and the same ~0.45 s of CPU), so compare CPU seconds when the machine is
# not idle (BENCHMARKS.md, "Engine data path").
#
# Scenarios:
#   linear3        three models of BENCH_SIZE (default 1.5G) bytes, linear merge
#   bigtensor      a model with a 512 MiB embedding tensor, --max-memory 64M
#   flat           linear3 at 0.5G, 1G, 2G and 4G per model (throughput vs size)
#   ties3          three models, ties (density 0.5), default budget
#   methods        every method family on the same three models (BENCH_SIZE, default 0.6G),
#                  output and floor on tmpfs (BENCH_OUT, default /dev/shm/ms-bench-$USER), then
#                  dare_ties at 1 and 2 threads (thread scaling of a multi-pass method;
#                  BENCH_SCALING=0 leaves it out); BENCH_METHODS restricts the list
#   zstd           linear3 written with --compress zstd:3, against `zstd -T0 -3` compressing
#                  the raw merge output (the same bytes) on the same machine
#   disk           inputs larger than RAM, from disk: three models of BENCH_SIZE (default 10G),
#                  linear and ties, output on disk (BENCH_OUT, default the models' directory),
#                  page cache dropped (sync; echo 3 > /proc/sys/vm/drop_caches, root only,
#                  else "skipped") before each floor and each merge; the floor does the
#                  engine's larger-than-memory I/O (ms-iofloor --behind); one run each
#                  (BENCH_REPEAT ignored); the models are deleted after unless BENCH_KEEP=1
#   remote         linear merge of three models (BENCH_SIZE, default 0.6G) read over HTTP
#                  range requests from nginx on loopback, against the same merge from the
#                  local files in the same run; checks that the outputs are identical
# Environment: BENCH_DIR (default BUILD/bench), BENCH_SIZE, BENCH_MEM (default 512M),
# BENCH_THREADS (default: cores), BENCH_REPEAT (default 3), BENCH_BLOCK (default 1065152),
# BENCH_KEEP=1 keeps the generated models.
set -eu
build=${1:-build}; shift || true
[ $# -gt 0 ] || set -- linear3 bigtensor
bin=$(cd "$build" && pwd)
dir=${BENCH_DIR:-$bin/bench}
mem=${BENCH_MEM:-512M}
threads=${BENCH_THREADS:-$(nproc)}
repeat=${BENCH_REPEAT:-3}
block=${BENCH_BLOCK:-1065152}
cold=0          # disk scenario: drop the page cache before each floor and merge
# Runs a command under GNU time when there: "cpu: USER SYS" (its children's too) on stderr.
cpu_run() { if [ -x /usr/bin/time ]; then /usr/bin/time -f 'cpu: %U %S' "$@"; else "$@"; fi; }
floor_args=     # disk scenario: --behind
mkdir -p "$dir"

can_drop() { [ "$(id -u)" = 0 ] && [ -w /proc/sys/vm/drop_caches ]; }
drop_caches() { sync; echo 3 > /proc/sys/vm/drop_caches; }

size_bytes() { # 1.5G -> bytes
    awk -v s="$1" 'BEGIN { m = 1; u = substr(s, length(s)); if (u ~ /[kK]/) m = 1e3;
        else if (u ~ /[mM]/) m = 1e6; else if (u ~ /[gGbB]/) m = 1e9;
        if (m > 1) s = substr(s, 1, length(s) - 1); printf "%.0f", s * m }'
}

gen3() { # gen3 NAME BYTES [extra mkmodel args] -> $dir/NAME/{base,ft1,ft2}
    name=$1; bytes=$2; shift 2
    d=$dir/$name
    if [ ! -f "$d/.done" ]; then
        rm -rf "$d"; mkdir -p "$d"
        if [ "$bytes" != 0 ]; then set -- --size "$bytes" "$@"; fi
        "$bin/ms-mkmodel" --dtype bf16 --shard-size 2B --seed 1 "$@" "$d/base" >/dev/null
        "$bin/ms-mkmodel" --base "$d/base" --noise 0.002 --seed 2 "$d/ft1" >/dev/null
        "$bin/ms-mkmodel" --base "$d/base" --noise 0.002 --seed 3 "$d/ft2" >/dev/null
        touch "$d/.done"
    fi
}

recipe() { # recipe FILE METHOD DIR
    case $2 in
    linear) cat > "$1" <<R
merge_method: linear
dtype: bfloat16
models:
  - model: $3/base
    parameters: {weight: 0.5}
  - model: $3/ft1
    parameters: {weight: 0.3}
  - model: $3/ft2
    parameters: {weight: 0.2}
R
    ;;
    linear|ties) ;;
    slerp) printf 'merge_method: slerp\ndtype: bfloat16\nbase_model: %s/base\nmodels:\n  - model: %s/base\n  - model: %s/ft1\nparameters: {t: 0.4}\n' "$3" "$3" "$3" > "$1" ;;
    nuslerp) printf 'merge_method: nuslerp\ndtype: bfloat16\nmodels:\n  - model: %s/ft1\n    parameters: {weight: 1.0}\n  - model: %s/ft2\n    parameters: {weight: 0.5}\n' "$3" "$3" > "$1" ;;
    multislerp|karcher) printf 'merge_method: %s\ndtype: bfloat16\nmodels:\n  - model: %s/base\n    parameters: {weight: 0.5}\n  - model: %s/ft1\n    parameters: {weight: 0.3}\n  - model: %s/ft2\n    parameters: {weight: 0.2}\n' "$2" "$3" "$3" "$3" > "$1" ;;
    model_stock) printf 'merge_method: model_stock\ndtype: bfloat16\nbase_model: %s/base\nmodels:\n  - model: %s/ft1\n  - model: %s/ft2\n' "$3" "$3" "$3" > "$1" ;;
    *) # the GTA family and sce: base + two fine-tunes with weight and density
        printf 'merge_method: %s\ndtype: bfloat16\nbase_model: %s/base\nmodels:\n  - model: %s/ft1\n    parameters: {weight: 0.5, density: 0.5}\n  - model: %s/ft2\n    parameters: {weight: 0.5, density: 0.5}\n' "$2" "$3" "$3" "$3" > "$1"
        case $2 in della*) printf 'parameters: {epsilon: 0.1}\n' >> "$1" ;; sce) printf 'parameters: {select_topk: 0.5}\n' >> "$1" ;; esac ;;
    esac
    case $2 in
    ties) cat > "$1" <<R
merge_method: ties
dtype: bfloat16
base_model: $3/base
models:
  - model: $3/ft1
    parameters: {weight: 0.5, density: 0.5}
  - model: $3/ft2
    parameters: {weight: 0.5, density: 0.5}
R
    ;;
    esac
}

measure() { # measure LABEL METHOD DIR MEM [OUTDIR [THREADS]]
    label=$1; method=$2; d=$3; m=$4; od=${5:-$d}; th=${6:-$threads}
    r=$d/$method.yml; out=$od/out-$method
    recipe "$r" "$method" "$d"
    inputs=$(ls "$d"/base/*.safetensors "$d"/ft1/*.safetensors "$d"/ft2/*.safetensors)
    in_bytes=$(cat $inputs | wc -c)
    out_bytes=$(ls -l "$d"/base/*.safetensors | awk '{ s += $5 } END { printf "%.0f", s }')
    n=$repeat; [ "$cold" = 0 ] || n=1
    floor=; wall=; fcpu=; cpu=; rss=0; k=0
    rm -rf "$out" "$od/floor.bin"
    if [ "$cold" = 0 ]; then  # warm-up floor, discarded (see the top)
        cat $inputs > /dev/null
        "$bin/ms-iofloor" --block "$block" $floor_args "$od/floor.bin" "$out_bytes" $inputs >/dev/null
    fi
    while [ $k -lt $n ]; do
        k=$((k + 1))
        rm -rf "$out"  # the floor and the merge start with the same files in $od
        if [ "$cold" = 1 ]; then drop_caches; else cat $inputs > /dev/null; fi  # cold or warm cache
        fl=$("$bin/ms-iofloor" --block "$block" $floor_args "$od/floor.bin" "$out_bytes" $inputs)
        f=$(echo "$fl" | sed -n 's/.*wall_s=\([0-9.]*\).*/\1/p')
        fc=$(echo "$fl" | awk '{ for (i = 1; i <= NF; i++) { split($i, kv, "=");
             if (kv[1] == "user_s" || kv[1] == "sys_s") c += kv[2] } } END { print c + 0 }')
        [ "$cold" = 0 ] || drop_caches
        t=$( { cpu_run "$bin/ms-timeit" "$bin/mergestream" merge "$r" "$out" -q --max-memory "$m" \
                --threads "$th" --out-shard-size 2B; } 2>&1 >/dev/null | grep -E '^(timeit|cpu):' )
        w=$(echo "$t" | sed -n 's/.*wall_s=\([0-9.]*\).*/\1/p')
        c=$(echo "$t" | sed -n 's/^cpu: \([0-9.]*\) \([0-9.]*\)$/\1 \2/p' | awk '{ print $1 + $2 }')
        rs=$(echo "$t" | sed -n 's/.*maxrss_kib=\([0-9]*\).*/\1/p')
        st=$(echo "$t" | sed -n 's/.*status=\([0-9]*\).*/\1/p')
        [ "$st" = 0 ] || { echo "bench: merge failed (status $st)"; exit 1; }
        floor=$(awk -v a="$floor" -v b="$f" 'BEGIN { print (a == "" || b < a) ? b : a }')
        wall=$(awk -v a="$wall" -v b="$w" 'BEGIN { print (a == "" || b < a) ? b : a }')
        fcpu=$(awk -v a="$fcpu" -v b="$fc" 'BEGIN { print (a == "" || b < a) ? b : a }')
        cpu=$(awk -v a="$cpu" -v b="${c:-0}" 'BEGIN { print (a == "" || b < a) ? b : a }')
        rss=$(( rs > rss ? rs : rss ))
    done
    awk -v l="$label" -v sz="$(ls -l "$d"/base/*.safetensors | awk '{s+=$5} END {print s/1e9}')" \
        -v w="$wall" -v f="$floor" -v io="$in_bytes" -v ob="$out_bytes" -v rss="$rss" -v m="$m" \
        -v c="$cpu" -v fc="$fcpu" \
        'BEGIN { printf "%-12s %6.2f GB  wall %7.2f s  floor %7.2f s  ratio %5.2f  %7.0f MB/s  peak RSS %6.1f MiB  budget %s",
                 l, sz, w, f, w / f, (io + ob) / w / 1e6, rss / 1024, m;
                 if (c > 0 && fc > 0) printf "  cpu %6.2f s  floor cpu %5.2f s  cpu ratio %5.2f", c, fc, c / fc;
                 printf "\n" }'
    rm -rf "$out" "$od/floor.bin"
}

echo "bench: $(nproc) cores, threads $threads, $(date -u +%Y-%m-%dT%H:%MZ), load $(cut -d' ' -f1-3 /proc/loadavg);" \
     "floor and merge each the best of $repeat runs (disk: 1, cold cache), floor blocks $block bytes"
for s in "$@"; do
    case $s in
    linear3)
        b=$(size_bytes "${BENCH_SIZE:-1.5G}")
        gen3 linear3 "$b"
        measure linear3 linear "$dir/linear3" "$mem" ;;
    ties3)
        b=$(size_bytes "${BENCH_SIZE:-1.5G}")
        gen3 linear3 "$b"
        measure ties3 ties "$dir/linear3" "$mem" ;;
    methods)
        b=$(size_bytes "${BENCH_SIZE:-0.6G}")
        gen3 methods "$b"
        od=${BENCH_OUT:-/dev/shm/ms-bench-$(id -un)}
        mkdir -p "$od"
        for me in ${BENCH_METHODS:-linear task_arithmetic slerp nuslerp multislerp karcher \
                  model_stock ties breadcrumbs_ties dare_ties dare_linear della sce}; do
            measure "$me" "$me" "$dir/methods" "$mem" "$od"
        done
        for th in 1 2; do
            [ "${BENCH_SCALING:-1}" = 0 ] ||
                measure "dare_ties/t$th" dare_ties "$dir/methods" "$mem" "$od" "$th"
        done
        rmdir "$od" 2>/dev/null || true ;;
    zstd)
        b=$(size_bytes "${BENCH_SIZE:-1.5G}")
        gen3 linear3 "$b"
        d=$dir/linear3
        recipe "$d/linear.yml" linear "$d"
        rm -rf "$d/zraw" "$d/zout"
        "$bin/mergestream" merge "$d/linear.yml" "$d/zraw" -q --out-shard-size 2B --threads "$threads"
        raw=$(cat "$d"/zraw/*.safetensors | wc -c)
        t0=$(date +%s.%N)
        cat "$d"/zraw/*.safetensors | zstd -T0 -3 -q -c > "$d/zstd-cli.zst"
        t1=$(date +%s.%N)
        zc=$(wc -c < "$d/zstd-cli.zst")
        t=$( { "$bin/ms-timeit" "$bin/mergestream" merge "$d/linear.yml" "$d/zout" -q \
                --out-shard-size 2B --threads "$threads" --compress zstd:3; } 2>&1 >/dev/null | grep '^timeit:')
        wall=$(echo "$t" | sed -n 's/.*wall_s=\([0-9.]*\).*/\1/p')
        zm=$(cat "$d"/zout/*.zst | wc -c)
        awk -v raw="$raw" -v a="$t0" -v b="$t1" -v zc="$zc" -v w="$wall" -v zm="$zm" \
            'BEGIN { printf "zstd         zstd -T0 -3 alone: %6.2f s  %6.0f MB/s  ratio %.3f\n", b - a, raw / (b - a) / 1e6, zc / raw;
                     printf "zstd         merge --compress zstd:3 (read+merge+compress): %6.2f s  %6.0f MB/s of output  ratio %.3f\n", w, raw / w / 1e6, zm / raw }'
        rm -rf "$d/zraw" "$d/zout" "$d/zstd-cli.zst" ;;
    remote)
        b=$(size_bytes "${BENCH_SIZE:-0.6G}")
        gen3 remote "$b"
        d=$dir/remote
        command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || { echo "bench: remote needs nginx"; exit 1; }
        ngx=$(command -v nginx || echo /usr/sbin/nginx)
        mkdir -p "$d/ngx/logs" "$d/ngx/tmp"
        port=$(( 20000 + $$ % 20000 ))
        { [ "$(id -u)" = 0 ] && echo "user root;"
          echo "daemon off; worker_processes 2; pid $d/ngx/pid; error_log $d/ngx/logs/error.log;"
          echo "events { worker_connections 256; }"
          echo "http { access_log off; sendfile on; keepalive_requests 100000;"
          echo "  client_body_temp_path $d/ngx/tmp; proxy_temp_path $d/ngx/tmp;"
          echo "  fastcgi_temp_path $d/ngx/tmp; uwsgi_temp_path $d/ngx/tmp; scgi_temp_path $d/ngx/tmp;"
          echo "  server { listen 127.0.0.1:$port; root $d; } }"; } > "$d/ngx/conf"
        "$ngx" -c "$d/ngx/conf" -p "$d/ngx" & npid=$!
        trap 'kill $npid 2>/dev/null || true' EXIT
        i=0; until curl -sf -o /dev/null "http://127.0.0.1:$port/base/config.json"; do
            i=$((i + 1)); [ $i -lt 100 ] || { echo "bench: nginx did not start"; exit 1; }; sleep 0.1
        done
        recipe "$d/local.yml" linear "$d"
        recipe "$d/remote.yml" linear "http://127.0.0.1:$port"
        cat "$d"/*/*.safetensors > /dev/null  # warm cache: both read from memory
        in_bytes=$(cat "$d"/base/*.safetensors "$d"/ft1/*.safetensors "$d"/ft2/*.safetensors | wc -c)
        for w in local remote; do
            rm -rf "$d/out-$w"
            t=$( { "$bin/ms-timeit" "$bin/mergestream" merge "$d/$w.yml" "$d/out-$w" -q \
                    --max-memory "$mem" --threads "$threads" --out-shard-size 2B; } 2>&1 >/dev/null | grep '^timeit:')
            echo "$t" | grep -q 'status=0' || { echo "bench: $w merge failed: $t"; exit 1; }
            eval "wall_$w=$(echo "$t" | sed -n 's/.*wall_s=\([0-9.]*\).*/\1/p')"
            eval "rss_$w=$(echo "$t" | sed -n 's/.*maxrss_kib=\([0-9]*\).*/\1/p')"
        done
        for f in "$d"/out-local/*.safetensors; do cmp "$f" "$d/out-remote/${f##*/}"; done
        kill $npid; wait $npid 2>/dev/null || true; trap - EXIT
        awk -v l="$wall_local" -v r="$wall_remote" -v rl="$rss_local" -v rr="$rss_remote" \
            -v io="$in_bytes" -v m="$mem" -v sz="$(cat "$d"/base/*.safetensors | wc -c)" \
            'BEGIN { printf "remote       %6.2f GB  local %7.2f s  remote %7.2f s  ratio %5.2f  remote %7.0f MB/s in  peak RSS %6.1f / %6.1f MiB  budget %s  (outputs identical)\n",
                     sz / 1e9, l, r, r / l, io / r / 1e6, rl / 1024, rr / 1024, m }'
        rm -rf "$d/out-local" "$d/out-remote" ;;
    disk)
        can_drop || { echo "disk         skipped: dropping the page cache needs root"; continue; }
        b=$(size_bytes "${BENCH_SIZE:-10G}")
        gen3 disk "$b"
        d=$dir/disk; od=${BENCH_OUT:-$d}
        mkdir -p "$od"
        cold=1; floor_args=--behind
        for me in linear ties; do
            measure "disk/$me" "$me" "$d" "$mem" "$od"
        done
        cold=0; floor_args=
        [ -n "${BENCH_KEEP:-}" ] || rm -rf "$d" ;;
    bigtensor)
        gen3 bigtensor 0 --layers 1 --hidden 4096 --intermediate 256 --vocab 65536
        measure bigtensor linear "$dir/bigtensor" 64M ;;
    flat)
        for sz in 0.5G 1G 2G 4G; do
            gen3 "flat-$sz" "$(size_bytes $sz)"
            measure "flat-$sz" linear "$dir/flat-$sz" "$mem"
            [ -n "${BENCH_KEEP:-}" ] || rm -rf "$dir/flat-$sz"
        done ;;
    *) echo "bench: unknown scenario $s"; exit 2 ;;
    esac
done
