#!/usr/bin/env bash
# Run every benchmark in its tiny smoke mode so none can rot (CI). Writes nothing under benchmarks/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
data_dir="${LIGHTNING_SCL_DATA:-$scratch/data}"
for script in benchmarks/*.py; do
    case "$script" in
        benchmarks/summarize.py) args=(--smoke) ;;
        benchmarks/mnist_pruning.py | benchmarks/export_benchmark.py | benchmarks/short_runs.py) args=(--smoke --data-dir "$data_dir") ;;
        *) args=(--smoke) ;;
    esac
    echo "-- $script ${args[*]}"
    python "$script" "${args[@]}" > /dev/null
done
echo "-- benchmarks/mnist_pruning.py with distillation from a dense teacher"
python benchmarks/mnist_pruning.py --smoke --data-dir "$data_dir" --method dense --save-model "$scratch/teacher.pt" > /dev/null
python benchmarks/mnist_pruning.py --smoke --data-dir "$data_dir" --teacher "$scratch/teacher.pt" > /dev/null
echo "-- benchmarks/mnist_pruning.py pruning the trained dense network"
python benchmarks/mnist_pruning.py --smoke --data-dir "$data_dir" --init-from "$scratch/teacher.pt" > /dev/null
echo "-- benchmarks/mnist_pruning.py with ELU, on all training images, distilled from an ELU teacher"
python benchmarks/mnist_pruning.py --smoke --data-dir "$data_dir" --method dense --activation elu --save-model "$scratch/teacher_elu.pt" > /dev/null
python benchmarks/mnist_pruning.py --smoke --data-dir "$data_dir" --activation elu --val-size 0 --teacher "$scratch/teacher_elu.pt" > /dev/null
echo "-- benchmarks/mnist_pruning.py retraining the pruned network with the learning rate rewound"
python benchmarks/mnist_pruning.py --smoke --data-dir "$data_dir" --model lenet5 --retrain-epochs 2 > /dev/null
echo "-- benchmarks/mnist_pruning.py with EMA weight averaging"
python benchmarks/mnist_pruning.py --smoke --data-dir "$data_dir" --ema 0.99 > /dev/null
echo "-- benchmarks/short_runs.py training the dense baseline"
python benchmarks/short_runs.py --smoke --dense --data-dir "$data_dir" > /dev/null
echo "benchmark smoke runs OK"
