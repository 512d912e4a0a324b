#!/usr/bin/env bash
# The fuzz targets of viommu-user (cargo-fuzz / libFuzzer). See fuzz/README.md.
#
#   run.sh smoke               build every target, fuzz each for FUZZ_SECONDS (60) on a scratch
#                              copy of its corpus, then replay every committed corpus and
#                              regression input; ends with "N passed, M failed"
#   run.sh long TARGET EXECS   a long campaign of EXECS executions (-runs=EXECS; at most
#                              FUZZ_MAX_SECONDS if set) on a working corpus under
#                              fuzz/target/long/, then its exec count, exec/s and coverage
#   run.sh seeds               rewrite fuzz/corpus/ with the seed generator
#
# Exit status: 0 all passed, 1 something failed, 77 (with a line "SKIPPED: ...") when
# cargo-fuzz cannot be had. cargo-fuzz's sanitizer and coverage flags need nightly features;
# RUSTC_BOOTSTRAP=1 enables them on the stable toolchain.
set -uo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"
export RUSTC_BOOTSTRAP=1
TARGETS=(protocol_frontend protocol_backend cmdq walk session)
# The protocol decoders run under AddressSanitizer (descriptor passing goes through unsafe
# code); the model targets, whose every input builds guest tables in fresh RAM, run without a
# sanitizer by default (about twice the executions; safe Rust checks its own bounds), in a
# target directory of their own. FUZZ_MODEL_SANITIZER=address puts them under ASan too.
MODEL_TARGETS=" cmdq walk session "
model_sanitizer="${FUZZ_MODEL_SANITIZER:-none}"
protocol_sanitizer="${FUZZ_PROTOCOL_SANITIZER:-address}"
# Builds are cached outside the checkout when they can be (CI starts from a fresh clone and a
# sanitizer build takes minutes); FUZZ_BUILD_DIR overrides, fuzz/target is the fallback.
build_root="${FUZZ_BUILD_DIR:-/var/cache/viommu-fuzz}"
if ! mkdir -p "$build_root" 2>/dev/null || [ ! -w "$build_root" ]; then
    build_root="$here/target"
fi
seconds="${FUZZ_SECONDS:-60}"
# libFuzzer options every run gets: a hang is a finding, and so is runaway memory.
common=(-timeout=10 -rss_limit_mb=4096 -max_len=8192 -print_final_stats=1)

usage() {
    sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
}

ensure_cargo_fuzz() {
    if cargo fuzz --version >/dev/null 2>&1; then
        return 0
    fi
    echo "installing cargo-fuzz"
    if ! cargo install cargo-fuzz --locked >"$here/target/cargo-fuzz-install.log" 2>&1; then
        tail -n 20 "$here/target/cargo-fuzz-install.log" >&2
        echo "SKIPPED: cargo-fuzz cannot be installed (cargo install cargo-fuzz --locked failed)"
        exit 77
    fi
}

triple() {
    rustc -vV | sed -n 's/^host: //p'
}

is_model() {
    [[ "$MODEL_TARGETS" == *" $1 "* ]]
}

# Where a target's build goes.
target_dir() {
    if is_model "$1"; then
        echo "$build_root/model-$model_sanitizer"
    else
        echo "$build_root/protocol-$protocol_sanitizer"
    fi
}

# Builds the given targets (all when none is given), each with its sanitizer.
build() {
    local want=("$@") protocol=() model=()
    [ ${#want[@]} -eq 0 ] && want=("${TARGETS[@]}")
    for t in "${want[@]}"; do
        if is_model "$t"; then model+=("$t"); else protocol+=("$t"); fi
    done
    local log="$here/target/build-$$.log"
    for t in "${protocol[@]}"; do
        echo "building: cargo fuzz build -O -s $protocol_sanitizer --target-dir $(target_dir "$t") $t"
        cargo fuzz build -O -s "$protocol_sanitizer" --target-dir "$(target_dir "$t")" "$t" \
            >"$log" 2>&1 || { build_failed "$log"; return 1; }
    done
    for t in "${model[@]}"; do
        echo "building: cargo fuzz build -O -s $model_sanitizer --target-dir $(target_dir "$t") $t"
        cargo fuzz build -O -s "$model_sanitizer" --target-dir "$(target_dir "$t")" "$t" \
            >"$log" 2>&1 || { build_failed "$log"; return 1; }
    done
    rm -f "$log"
}

build_failed() {
    grep -E '^(error|warning)' -A 12 "$1" | head -n 60 >&2
    tail -n 5 "$1" >&2
}

bin() {
    echo "$(target_dir "$1")/$(triple)/release/$1"
}

# The final stats of a libFuzzer log: executions, exec/s, coverage.
stats() {
    local log="$1" execs rate last cov ft
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -n 1)
    last=$(grep -E '(DONE|INITED|pulse|NEW|REDUCE) +cov:' "$log" | tail -n 1)
    cov=$(sed -n 's/.*cov: \([0-9]*\).*/\1/p' <<<"$last")
    ft=$(sed -n 's/.*ft: \([0-9]*\).*/\1/p' <<<"$last")
    echo "execs ${execs:-?}, exec/s ${rate:-?}, cov ${cov:-?}, ft ${ft:-?}"
}

# Inputs of a directory, without the placeholder that keeps an empty directory in git.
has_inputs() {
    [ -d "$1" ] && [ -n "$(find "$1" -type f ! -name .gitkeep -print -quit)" ]
}

smoke() {
    mkdir -p "$here/target"
    ensure_cargo_fuzz
    local passed=0 failed=0 scratch logs
    scratch="$(mktemp -d "${TMPDIR:-/tmp}/viommu-fuzz.XXXXXX")"
    logs="$here/target/smoke"
    rm -rf "$logs"
    mkdir -p "$logs"
    if ! build; then
        echo "FAIL build"
        echo "0 passed, 1 failed"
        exit 1
    fi
    for t in "${TARGETS[@]}"; do
        mkdir -p "$scratch/$t" "$logs/artifacts-$t"
        cp -r "$here/corpus/$t/." "$scratch/$t/" 2>/dev/null
        "$(bin "$t")" "$scratch/$t" "${common[@]}" -max_total_time="$seconds" \
            -artifact_prefix="$logs/artifacts-$t/" >"$logs/$t.log" 2>&1
        local rc=$?
        if [ $rc -eq 0 ]; then
            passed=$((passed + 1))
            echo "PASS fuzz $t ($seconds s): $(stats "$logs/$t.log")"
        else
            failed=$((failed + 1))
            echo "FAIL fuzz $t (exit $rc): $(stats "$logs/$t.log")"
            grep -E 'panicked at|ERROR: libFuzzer|SUMMARY' -A 2 "$logs/$t.log" | head -n 12
            echo "  log: $logs/$t.log; input: $(ls "$logs/artifacts-$t/" | head -n 1)"
        fi
    done
    for t in "${TARGETS[@]}"; do
        local dirs=()
        has_inputs "$here/corpus/$t" && dirs+=("$here/corpus/$t")
        has_inputs "$here/regressions/$t" && dirs+=("$here/regressions/$t")
        if [ ${#dirs[@]} -eq 0 ]; then
            failed=$((failed + 1))
            echo "FAIL replay $t: no corpus"
            continue
        fi
        "$(bin "$t")" "${dirs[@]}" -runs=0 "${common[@]}" >"$logs/$t.replay.log" 2>&1
        local rc=$?
        local count
        count=$(find "${dirs[@]}" -type f ! -name .gitkeep | wc -l)
        if [ $rc -eq 0 ]; then
            passed=$((passed + 1))
            echo "PASS replay $t ($count inputs)"
        else
            failed=$((failed + 1))
            echo "FAIL replay $t (exit $rc, $count inputs)"
            grep -E 'panicked at|ERROR: libFuzzer|Running: ' -A 2 "$logs/$t.replay.log" | tail -n 12
        fi
    done
    rm -rf "$scratch"
    echo "$passed passed, $failed failed"
    [ "$failed" -eq 0 ]
}

long() {
    local t="$1" execs="$2"
    [[ " ${TARGETS[*]} " == *" $t "* ]] || { echo "unknown target $t" >&2; exit 2; }
    mkdir -p "$here/target"
    ensure_cargo_fuzz
    build "$t" || exit 1
    local work="$here/target/long/$t" artifacts="$here/target/long/artifacts-$t"
    mkdir -p "$work" "$artifacts"
    cp -rn "$here/corpus/$t/." "$work/" 2>/dev/null
    has_inputs "$here/regressions/$t" && cp -rn "$here/regressions/$t/." "$work/"
    local log="$here/target/long/$t.log"
    # FUZZ_MAX_SECONDS bounds a campaign in time as well (whichever comes first).
    local budget=()
    [ -n "${FUZZ_MAX_SECONDS:-}" ] && budget=(-max_total_time="$FUZZ_MAX_SECONDS")
    "$(bin "$t")" "$work" "${common[@]}" -runs="$execs" "${budget[@]}" \
        -artifact_prefix="$artifacts/" >"$log" 2>&1
    local rc=$?
    echo "$t: $(stats "$log") (exit $rc; log $log)"
    if [ $rc -ne 0 ]; then
        grep -E 'panicked at|ERROR: libFuzzer|SUMMARY' -A 2 "$log" | head -n 12
        echo "inputs: $(ls "$artifacts")"
    fi
    return $rc
}

case "${1:-}" in
    smoke) smoke ;;
    long)
        [ $# -eq 3 ] || usage
        long "$2" "$3"
        ;;
    seeds) cargo run --release --bin seeds -- "$here" ;;
    *) usage ;;
esac
