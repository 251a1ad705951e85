#!/bin/sh
# Run every atheris fuzz target for a bounded time over a copy of the committed corpus.
#
#   tests/fuzz/run.sh [-t SECONDS] [-m] [TARGET ...]
#
#   -t SECONDS  time per target (default: $FUZZ_SECONDS or 20)
#   -m          merge what the run found into tests/fuzz/corpus/<target>/ (minimised:
#               a small set of inputs covering all that was reached is kept); without it the corpus is untouched
#
# Exit status: 0 when no target crashed; 1 otherwise, with the crashing inputs left in
# $FUZZ_OUT (default: a new temporary folder, printed). Turn each one into a regression test
# (see tests/test_fuzz.py) and, once fixed, copy it into the corpus.
# Needs atheris in the venv (`.venv/bin/pip install atheris`; wheels exist for CPython 3.11).
set -eu

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
python=${PYTHON:-$root/.venv/bin/python}
seconds=${FUZZ_SECONDS:-20}
merge=no
while getopts t:m opt; do
    case $opt in
        t) seconds=$OPTARG ;;
        m) merge=yes ;;
        *) sed -n '2,14p' "$0" >&2; exit 64 ;;
    esac
done
shift $((OPTIND - 1))
if [ $# -eq 0 ]; then
    set -- argv address message header_limit dotdata smtp spoolfmt bounce
fi
if ! "$python" -c 'import atheris' 2>/dev/null; then
    echo "run.sh: atheris is not installed for $python (pip install atheris)" >&2
    exit 69
fi
out=${FUZZ_OUT:-$(mktemp -d "${TMPDIR:-/tmp}/mailshim-fuzz.XXXXXX")}
mkdir -p "$out"
failed=""
for target in "$@"; do
    corpus="$here/corpus/$target"
    work="$out/$target/corpus"
    crashes="$out/$target/crashes"
    mkdir -p "$corpus" "$work" "$crashes"
    cp "$corpus"/* "$work"/ 2>/dev/null || true
    echo "=== $target: ${seconds}s, $(ls "$work" | wc -l) corpus inputs" >&2
    # New finds go to the first folder (the copy); -timeout and -rss_limit_mb turn hangs and
    # memory blow-ups into findings too. -max_len bounds the input, not what it expands to.
    if "$python" "$here/harness.py" "$target" \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -max_len=8192 \
        -artifact_prefix="$crashes/" -print_final_stats=1 \
        "$work" >"$out/$target/log" 2>&1; then
        grep -E '^(stat::number_of_executed_units|stat::peak_rss_mb|#[0-9]+ +DONE)' \
            "$out/$target/log" >&2 || true
    else
        failed="$failed $target"
        tail -n 40 "$out/$target/log" >&2
    fi
    if [ "$merge" = yes ]; then
        # libFuzzer's merge re-runs argv[0]: give it a wrapper that names the target.
        wrapper="$out/$target/self"
        printf '#!/bin/sh\nexec "%s" "%s" "%s" "$@"\n' "$python" "$here/harness.py" "$target" \
            >"$wrapper"
        chmod +x "$wrapper"
        MAILSHIM_FUZZ_SELF=$wrapper "$wrapper" -set_cover_merge=1 "$corpus" "$work" \
            >>"$out/$target/log" 2>&1 || failed="$failed $target(merge)"
        echo "    corpus now $(ls "$corpus" | wc -l) inputs" >&2
    fi
done
echo "logs and crashes: $out" >&2
if [ -n "$failed" ]; then
    echo "run.sh: crashed:$failed" >&2
    exit 1
fi
