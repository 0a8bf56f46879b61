#!/usr/bin/env bash
# Run every benchmark in its tiny smoke mode so none can rot (CI). Writes nothing under benchmarks/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
data_dir="${LIGHTNING_SCL_DATA:-$(mktemp -d)}"
for script in benchmarks/*.py; do
    case "$script" in
        benchmarks/summarize.py) args=(--smoke) ;;
        benchmarks/mnist_pruning.py | benchmarks/export_benchmark.py) args=(--smoke --data-dir "$data_dir") ;;
        *) args=(--smoke) ;;
    esac
    echo "-- $script ${args[*]}"
    python "$script" "${args[@]}" > /dev/null
done
echo "benchmark smoke runs OK"
