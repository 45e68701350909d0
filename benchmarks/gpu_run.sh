#!/usr/bin/env bash
# The parameterization benchmark on the GPU machine lent through the device tool, in one call.
#
# That machine reaches nothing outside itself, and what travels to it is at most 64 MiB: the default
# model's file (98 MB) and the corpus cannot go. Training speed does not depend on the weights'
# values, so it trains the same documents' training sequences on a randomly initialised model of the
# default architecture (config and tokenizer travel; no augmentation or question latency there).
#
#   1. here, once (CPU; needs ../shared/data and the default model, i.e. after `make test`):
#        benchmarks/gpu_run.sh prepare          # writes .gpu/ (git-ignored), ~1 min from the committed
#                                               # sequences; `prepare --fresh` augments them anew
#   2. through the device tool: run command "benchmarks/gpu_run.sh device", carry [".gpu"]
#      (about 4 minutes on the GPU; the JSON and log come back in $OUT)
set -euo pipefail
cd "$(dirname "$0")/.."

case "${1:-}" in
prepare)
    python=.venv/bin/python
    mkdir -p .gpu/model .gpu/whl
    if [ "${2:-}" = "--fresh" ] || [ ! -f benchmarks/data/sequences_popqa64.json.gz ]; then
        # the benchmark's 64 documents, augmented and their training sequences saved (hours on a busy 2-core
        # machine: cheap settings otherwise, only the sequences file matters)
        PYTHONPATH=src $python benchmarks/parameterize.py --home runs/bench --corpus ../shared/data/corpus.jsonl \
            --questions ../shared/data/qa/popqa/dev.jsonl --docs 64 --peft-docs 1 --reference-docs 0 \
            --augment-docs 0 --latency-questions 0 --no-compile --save-documents .gpu/sequences.json \
            --out runs/bench/prepare.json
    else  # the same sequences, committed (benchmarks/data/README.md)
        gunzip -c benchmarks/data/sequences_popqa64.json.gz > .gpu/sequences.json
    fi
    model_dir=$($python -c "from prag.llm import resolve_model_dir; print(resolve_model_dir('SmolLM2-135M-Instruct'))")
    for f in config.json generation_config.json tokenizer.json tokenizer_config.json chat_template.jinja; do
        cp "$model_dir/$f" .gpu/model/
    done
    # `import prag` needs these; the GPU image has Python 3.12 and everything else
    for pkg in bm25s PyStemmer; do
        version=$($python -m pip show "$pkg" | sed -n 's/^Version: //p')
        python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            -d .gpu/whl "$pkg==$version"
    done
    du -sh .gpu
    ;;
device)
    out=${OUT:-runs/gpu}
    mkdir -p "$out"
    if ! python3 -c "import bm25s, Stemmer" 2>/dev/null; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .gpu/whl/*.whl
    fi
    export PYTHONPATH=/tmp/site:src PYTHONUNBUFFERED=1
    (nvidia-smi -L || echo "no GPU") | tee "$out/gpu.txt"
    python3 benchmarks/parameterize.py --documents .gpu/sequences.json --model-dir .gpu/model --random-weights \
        --docs 64 --peft-docs 16 --reference-docs 1 --batch-sizes 8,16,32,64 --out "$out/parameterize_gpu.json" \
        2>&1 | tee "$out/log.txt"
    ;;
*)
    echo "usage: $0 prepare|device" >&2
    exit 2
    ;;
esac
