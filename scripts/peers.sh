#!/usr/bin/env bash
# Peer virtualenvs (`make peers`): one per peer package whose pins clash with ours (sae-lens +
# sae-bench, sae-dashboard, neuronpedia), under .peers/<name>/, for the tests that compare polysae's
# output with the real package (tests/peers.py runs snippets in them; see docs/development.md).
#
#   bash scripts/peers.sh [name ...]            build (or confirm) the named peers, default all
#   bash scripts/peers.sh --relock [name ...]   re-resolve from the `# requires:` line, rewrite the lock
#
# Each peer is described by scripts/peers/<name>.txt: a header of directives, then the full lock
# (`pip freeze` of a successful resolution). Directives:
#   # requires: SPEC ...   what --relock resolves (exact versions of the peer packages)
#   # constrain: SPEC ...  extra constraints for --relock (a runtime need that some package's
#                          metadata fails to declare)
#   # torch: VERSION|none  torch is installed first and alone, as its CPU build VERSION+cpu
#   # prune: NAME ...      removed after --relock resolves (never needed on CPU); `pip check` may name them
#   # smoke: CODE          must run (offline) in the finished venv, or the peer counts as failed
#   # alias: NAME          this peer lives in NAME's venv (.peers/<this> is a symlink to it)
# A build installs torch, then the lock with --no-deps (exactly the pinned set, nothing resolved),
# then runs `pip check` and the smoke code. Only the build needs the registries; the venv needs no
# network afterwards. A stamp (.peers/<name>/.stamp, the lock's sha256) makes a re-run instant; a
# changed lock rebuilds the venv from scratch.
#
# Prints one line per peer, "<name>: ok ..." or "<name>: failed (reason)"; a failed peer writes the
# reason to .peers/<name>/FAILED (the full log is .peers/<name>/build.log) and never stops the others.
# Exits 0 whenever the script itself ran (2 on a usage error).
# shellcheck disable=SC2317  # functions run through `step "..." fn args`
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
PY=${PYTHON:-python3}
SPECS=scripts/peers
ROOT=${POLYSAE_PEERS_DIR:-.peers}   # relative to the repository root; tests/peers.py reads the same variable
CPU_INDEX=https://download.pytorch.org/whl/cpu

relock=0
if [ "${1:-}" = "--relock" ]; then relock=1; shift; fi
if [ $# -eq 0 ]; then
    for f in "$SPECS"/*.txt; do f=${f##*/}; set -- "$@" "${f%.txt}"; done
fi
for name in "$@"; do
    [ -f "$SPECS/$name.txt" ] || { echo "peers: unknown peer '$name' (no $SPECS/$name.txt)" >&2; exit 2; }
done

directive() { sed -n "s/^# $1: *//p" "$2" | head -n1; }
hash_of() { sha256sum < "$1" | cut -c1-16; }

# runs "$@" with its output appended to $log; on failure sets $reason to "<what>: <its last error line>"
reason=""
step() {
    local what=$1 t0=$SECONDS n0 rc=0 err; shift
    echo "+ $what: $*" >> "$log"
    n0=$(wc -l < "$log")
    "$@" >> "$log" 2>&1 || rc=$?
    echo "+ ($what: $((SECONDS - t0)) s, exit $rc)" >> "$log"
    [ $rc = 0 ] && return 0
    err=$(tail -n +$((n0 + 1)) "$log" | grep -v -E '^(\+ |WARNING: |\s*$)' \
          | grep -E '^(ERROR|error|[A-Za-z.]*(Error|Exception)\b)' | tail -n1 | cut -c1-300)
    [ -n "$err" ] || err=$(tail -n +$((n0 + 1)) "$log" | grep -v -E '^(\+ |WARNING: |\s*$)' | tail -n1 | cut -c1-300)
    reason="$what: ${err:-exit status $rc}"
    return 1
}

install_torch() {  # $1 venv, $2 version: the CPU build only, never a CUDA one
    local pip=("$1/bin/python" -m pip install -q --no-cache-dir)
    "${pip[@]}" "torch==$2+cpu" || "${pip[@]}" "torch==$2+cpu" --index-url "$CPU_INDEX" || return 1
    "$1/bin/python" -c "import torch, sys; v = torch.__version__; print('torch', v); sys.exit(not v.endswith('+cpu'))"
}

smoke() {  # $1 venv, $2 code: offline (no network at all where `unshare -n` works), from a temp dir
    local d py rc net=()
    py="$(cd "$1" && pwd)/bin/python"
    unshare -n true 2>/dev/null && net=(unshare -n)
    d=$(mktemp -d)
    (cd "$d" && HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled \
        "${net[@]}" "$py" -c "$2")
    rc=$?
    rm -rf "$d"
    return "$rc"
}

pip_check() {  # $1 venv, $2 pruned names: `pip check` must be clean except for what was pruned
    local bad p
    bad=$("$1/bin/python" -m pip check 2>&1 | grep -v -E '^(No broken requirements|\s*$)')
    for p in ${2}; do  # word-split on purpose: a list of names
        bad=$(echo "$bad" | grep -v -i -E " requires ${p}, which is not installed" || true)
    done
    [ -z "$bad" ] || { echo "$bad"; return 1; }
    echo "pip check: ok${2:+ (pruned: $2)}"
}

write_lock() {  # $1 venv, $2 spec file: keep the header, replace the pins with pip freeze
    local tmp torch
    tmp=$(mktemp)
    torch=$(directive torch "$2")
    {
        sed -n '/^# --- lock/q;/^#/!q;p' "$2"
        echo "# --- lock: pip freeze after 'scripts/peers.sh --relock $(basename "$2" .txt)'" \
             "(CPython $("$1/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])'), $(uname -m)) ---"
        [ "$torch" = none ] || echo "torch==$torch"
        "$1/bin/python" -m pip freeze --exclude torch | LC_ALL=C sort -f
    } > "$tmp" && mv "$tmp" "$2"
}

build() {  # $1 name; sets $reason on failure
    local name=$1 spec="$SPECS/$1.txt" dir="$ROOT/$1"
    local torch code requires constrain prune
    torch=$(directive torch "$spec"); code=$(directive smoke "$spec")
    read -r -a requires <<< "$(directive requires "$spec")"
    read -r -a constrain <<< "$(directive constrain "$spec")"
    read -r -a prune <<< "$(directive prune "$spec")"
    rm -rf "$dir"; mkdir -p "$dir"
    log="$dir/build.log"; : > "$log"
    step "create venv" "$PY" -m venv "$dir" || return 1
    if [ "$torch" != none ]; then
        step "install torch==$torch+cpu" install_torch "$dir" "$torch" || return 1
    fi
    if [ $relock = 1 ]; then
        local c; c=$(mktemp)
        { [ "$torch" = none ] || echo "torch==$torch"; printf '%s\n' "${constrain[@]}"; } > "$c"
        step "resolve ${requires[*]}" "$dir/bin/python" -m pip install -q -c "$c" "${requires[@]}" \
            || { rm -f "$c"; return 1; }
        rm -f "$c"
        [ ${#prune[@]} = 0 ] || step "prune ${prune[*]}" "$dir/bin/python" -m pip uninstall -q -y "${prune[@]}" \
            || return 1
        step "write lock" write_lock "$dir" "$spec" || return 1
    else
        step "install lock" "$dir/bin/python" -m pip install -q --no-deps -r "$spec" || return 1
    fi
    step "pip check" pip_check "$dir" "${prune[*]}" || return 1
    [ -z "$code" ] || step "smoke test" smoke "$dir" "$code" || return 1
}

ensure() {  # $1 name: build unless up to date; print its line
    local name=$1 spec="$SPECS/$1.txt" dir="$ROOT/$1" target want start
    [[ " $done " == *" $name "* ]] && return 0
    done="$done $name "
    target=$(directive alias "$spec")
    if [ -n "$target" ]; then  # lives in another peer's venv: build that one, then link
        ensure "$target"
        rm -rf "$dir"; ln -s "$target" "$dir"
        if [ -f "$ROOT/$target/FAILED" ]; then
            echo "$name: failed (in $ROOT/$target: $(cat "$ROOT/$target/FAILED"))"
        else
            echo "$name: ok (in $ROOT/$target)"
        fi
        return 0
    fi
    want=$(hash_of "$spec")
    [ -L "$dir" ] && rm -f "$dir"
    if [ $relock = 0 ] && [ -f "$dir/.stamp" ] && [ "$(cat "$dir/.stamp")" = "$want" ] \
        && [ ! -f "$dir/FAILED" ] && "$dir/bin/python" -c '' 2>/dev/null; then
        echo "$name: ok (up to date)"
        return 0
    fi
    start=$SECONDS; reason=""
    if build "$name"; then
        hash_of "$spec" > "$dir/.stamp"   # after --relock, the hash of the rewritten lock
        rm -f "$dir/FAILED"
        echo "$name: ok (built in $((SECONDS - start)) s, $(du -sh "$dir" | cut -f1))"
    else
        echo "$reason" > "$dir/FAILED"
        rm -f "$dir/.stamp"
        echo "$name: failed ($reason; log: $dir/build.log)"
    fi
}

mkdir -p "$ROOT"
exec 9> "$ROOT/.lock" && flock 9   # one build at a time per peers folder (CI and a developer may share one)
done=""
for name in "$@"; do ensure "$name"; done
exit 0
