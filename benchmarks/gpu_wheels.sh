#!/usr/bin/env bash
# Prepare, on THIS machine (it reaches the package registries), the wheels that the lent GPU
# machine lacks: DeepSpeed (built here: PyPI has only its sdist) and its pure/binary deps for
# the device's Python 3.12. Then call the device tool with carry [".whl"] and run
# `bash benchmarks/gpu_check.sh`, which installs them with --target /tmp/site.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
mkdir -p .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps deepspeed==0.19.8 -w .whl
"$PY" -m pip download -q --only-binary=:all: --python-version 3.12 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    hjson pydantic  # with their dependencies, versions resolved together
ls -la .whl
