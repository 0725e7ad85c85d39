#!/bin/sh
# Checks docs/model/ownership.pml with spin: every property on the real model (each in
# its scope, see README.md), then every bad variant, which must produce a counterexample.
# Installs nothing: needs spin and a C compiler on PATH.  Exits non-zero if a property is
# violated on the real model, or a bad variant passes.
#
#   docs/model/check.sh [WORKDIR]         (make model)
#   docs/model/check.sh WORKDIR NAME      one run of the tables below (tests/test_model.py)
set -u
here=$(cd "$(dirname "$0")" && pwd)
work=${1:-${TMPDIR:-/tmp}/ctrlgw-model}
only=${2:-}
CC=${CC:-cc}
command -v spin >/dev/null || { echo "spin is not installed (Debian: apt-get install spin)"; exit 2; }
command -v "$CC" >/dev/null || { echo "no C compiler ($CC)"; exit 2; }
mkdir -p "$work" || exit 2
rm -f "$work/.failed" "$work/.ran"

# name | spin -D flags (scope and variant) | pan mode: safety or ltl
# hash-compact (HC4) state storage throughout: see README.md for what that costs.
REAL='
safety-all-1claim|-DFULL_ONLY -DMAXCLAIMS=1|safety
safety-inbox-2claims|-DFULL_ONLY -DMAXCLAIMS=2 -DNO_DEATH -DNO_PRUNE -DNO_OUTBOX|safety
safety-outbox-2claims|-DFULL_ONLY -DMAXCLAIMS=2 -DMAXSENDS=1 -DNO_DEATH -DNO_PRUNE -DNO_INBOX|safety
safety-death-2claims|-DFULL_ONLY -DMAXCLAIMS=2 -DDEATH0 -DNO_PRUNE -DNO_INBOX -DNO_OUTBOX|safety
convergence-nonotify-2claims|-DMAXCLAIMS=2 -DNO_DEATH -DNO_PRUNE -DNO_INBOX -DNO_OUTBOX -DNOTIFY_NONE|ltl
convergence-death-1claim|-DMAXCLAIMS=1 -DNO_INBOX -DNO_OUTBOX|ltl
'
BAD='
bad-epoch-before-lock|-DFULL_ONLY -DMAXCLAIMS=2 -DNO_DEATH -DNO_PRUNE -DNO_INBOX -DNO_OUTBOX -DBAD_EPOCH_BEFORE_LOCK|safety
bad-no-inflight-guard|-DFULL_ONLY -DMAXCLAIMS=1 -DNO_DEATH -DNO_PRUNE -DNO_INBOX -DNO_OUTBOX -DBAD_NO_INFLIGHT_GUARD|safety
bad-unfenced-inbox|-DFULL_ONLY -DMAXCLAIMS=2 -DNO_DEATH -DNO_PRUNE -DNO_OUTBOX -DBAD_UNFENCED_INBOX|safety
bad-inbox-no-keyshare|-DFULL_ONLY -DMAXCLAIMS=2 -DNO_DEATH -DNO_PRUNE -DNO_OUTBOX -DBAD_INBOX_NO_KEYSHARE|safety
bad-release-any-epoch|-DFULL_ONLY -DMAXCLAIMS=2 -DNO_DEATH -DNO_PRUNE -DNO_INBOX -DNO_OUTBOX -DBAD_RELEASE_ANY_EPOCH|safety
bad-abort-stale|-DFULL_ONLY -DMAXCLAIMS=2 -DNO_DEATH -DNO_PRUNE -DNO_INBOX -DNO_OUTBOX -DBAD_ABORT_STALE|safety
bad-incremental-only|-DMAXCLAIMS=2 -DNO_DEATH -DNO_PRUNE -DNO_INBOX -DNO_OUTBOX -DNOTIFY_NONE -DINCREMENTAL_ONLY|ltl
'

# run NAME FLAGS MODE: prints one line; returns 0 if no error was found, 1 if one was, 2 if
# the run itself failed.
run() {
    dir="$work/$1"
    rm -rf "$dir" && mkdir -p "$dir" && cp "$here/ownership.pml" "$dir/" || return 2
    start=$(date +%s.%N)
    (
        cd "$dir" || exit 2
        # shellcheck disable=SC2086
        spin -a $2 ownership.pml >spin.out 2>&1 || exit 2
        if [ "$3" = ltl ]; then
            "$CC" -w -O2 -DHC4 -DNOBOUNDCHECK -DNFAIR=4 -o pan pan.c >cc.out 2>&1 || exit 2
            ./pan -m2000000 -w24 -a -f >pan.out 2>&1
        else
            "$CC" -w -O2 -DHC4 -DNOBOUNDCHECK -DSAFETY -DNOCLAIM -o pan pan.c >cc.out 2>&1 || exit 2
            ./pan -m2000000 -w24 >pan.out 2>&1
        fi
    ) || { echo "$1: spin or the compiler failed (see $dir)"; return 2; }
    secs=$(echo "$(date +%s.%N) - $start" | bc)
    out="$dir/pan.out"
    errors=$(sed -n 's/.*errors: \([0-9]*\).*/\1/p' "$out")
    states=$(sed -n 's/^ *\([0-9.e+]*\) states, stored.*/\1/p' "$out" | head -n 1)
    if grep -q "max search depth too small" "$out"; then
        echo "$1: search depth too small (see $out)"
        return 2
    fi
    [ -n "$errors" ] || { echo "$1: pan did not finish (see $out)"; return 2; }
    what=$(grep -m1 -E "assertion violated|acceptance cycle" "$out" | sed 's/^pan:[0-9]*: *//')
    printf '%s: %s states, %.1f s, errors %s%s\n' "$1" "$states" "$secs" "$errors" \
        "${what:+ ($what)}"
    [ "$errors" = 0 ]
}

status=0
echo "$REAL" | while IFS='|' read -r name flags mode; do
    [ -n "$name" ] || continue
    [ -z "$only" ] || [ "$only" = "$name" ] || continue
    echo x >>"$work/.ran"
    run "$name" "$flags" "$mode"
    case $? in
        0) ;;
        1) echo "FAIL: $name: a property is violated on the real model"; echo x >>"$work/.failed" ;;
        *) echo x >>"$work/.failed" ;;
    esac
done
echo "$BAD" | while IFS='|' read -r name flags mode; do
    [ -n "$name" ] || continue
    [ -z "$only" ] || [ "$only" = "$name" ] || continue
    echo x >>"$work/.ran"
    run "$name" "$flags" "$mode"
    case $? in
        1) ;;
        0) echo "FAIL: $name: the bad variant passes (no counterexample)"; echo x >>"$work/.failed" ;;
        *) echo x >>"$work/.failed" ;;
    esac
done
[ -s "$work/.ran" ] || { echo "no run named $only"; exit 2; }
if [ -s "$work/.failed" ]; then
    rm -f "$work/.failed"
    status=1
fi
exit $status
