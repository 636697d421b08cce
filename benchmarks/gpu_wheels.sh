#!/usr/bin/env bash
# Prepare HERE (this machine reaches the package registries) the wheels the lent GPU machine
# lacks, then print the device call. Works from a fresh clone: any python3 with pip will do.
#
# The device image (Python 3.12; see /work/.library/device/KINDS.md where that exists) holds
# torch 2.11 (cu130), Triton, numpy, pyarrow, tokenizers, safetensors, pytest, PyYAML, tqdm,
# packaging, psutil, py-cpuinfo, msgpack, ninja, einops and nvidia-ml-py -- everything
# maskscale's GPU check imports (benchmarks/trainer_bench.py, sampling_bench.py and
# tests/trainer/test_gpu.py, through trainer/ and pipeline/) except DeepSpeed and what
# DeepSpeed needs beyond that list: hjson and pydantic (pydantic-core, annotated-types,
# typing-inspection, and typing-extensions at the version pydantic asks for, which the image
# may predate). DeepSpeed imports mlflow only if present (its autotuner); datatrove, mlflow
# and lm-eval are imported by other commands, not by the check, so they stay behind.
#
# .whl/ is emptied first and gets exactly one wheel per distribution (two versions of one
# would stop the device's `pip install`): DeepSpeed built here with DS_BUILD_OPS=0 (PyPI has
# only its sdist; ops are JIT-built on use, and the trainer uses torch's AdamW), the rest as
# CPython 3.12 manylinux binaries. Then it checks the set: every requirement of every wheel is
# in the set or in the image; installed the way gpu_check.sh installs it into a Python 3.12,
# if one is found here (python3.12 on PATH, or pyenv's), hjson and pydantic import; and the
# tree the device tool sends (tracked + untracked-not-ignored files + .whl) fits its 64 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PY:-}"
if [[ -z "$PY" ]]; then
    if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
"$PY" -m pip --version >/dev/null || { echo "$PY has no pip: set PY=/path/to/python3" >&2; exit 2; }

DEEPSPEED=deepspeed==0.19.8
BINARIES=(hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0
          typing-inspection==0.4.5 typing-extensions==4.16.0)
# Present in the image (names; torch's version where a check needs it).
IMAGE="torch==2.11.0 triton numpy pyarrow tokenizers safetensors pytest pyyaml tqdm packaging
psutil py-cpuinfo msgpack ninja einops nvidia-ml-py filelock fsspec jinja2 networkx sympy"

rm -rf .whl
mkdir -p .whl
if [[ -d .git ]] || git rev-parse --git-dir >/dev/null 2>&1; then
    exclude="$(git rev-parse --git-path info/exclude)"
    grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
fi

echo "== building $DEEPSPEED (DS_BUILD_OPS=0)"
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps "$DEEPSPEED" -w .whl
echo "== downloading CPython 3.12 manylinux wheels: ${BINARIES[*]}"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --abi cp312 --abi abi3 --abi none \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 --platform any -d .whl "${BINARIES[@]}"

echo "== checking the set"
IMAGE="$IMAGE" "$PY" - <<'PYEOF'
import os, re, sys, zipfile
from pathlib import Path
from pip._vendor.packaging.markers import default_environment
from pip._vendor.packaging.requirements import Requirement
from pip._vendor.packaging.utils import canonicalize_name, parse_wheel_filename

wheels = sorted(Path(".whl").glob("*.whl"))
have, errors = {}, []
for w in wheels:
    name, version, _, _ = parse_wheel_filename(w.name)
    if name in have:
        errors.append(f"two wheels of {name}: {have[name][1].name} and {w.name}")
    have[name] = (version, w)
image = {}
for item in os.environ["IMAGE"].split():
    req = Requirement(item)
    pinned = next(iter(req.specifier), None)
    image[canonicalize_name(req.name)] = pinned.version if pinned else None
env = {**default_environment(), "python_version": "3.12", "python_full_version": "3.12.3",
       "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
       "implementation_name": "cpython", "extra": ""}
for name, (version, w) in have.items():
    with zipfile.ZipFile(w) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        lines = z.read(meta).decode().splitlines()
    for line in lines:
        if not line.startswith("Requires-Dist:"):
            continue
        req = Requirement(line.split(":", 1)[1].strip())
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        dep = canonicalize_name(req.name)
        if dep in have:
            if not req.specifier.contains(str(have[dep][0]), prereleases=True):
                errors.append(f"{name} needs {req}, the set has {dep} {have[dep][0]}")
        elif dep in image:
            if image[dep] and not req.specifier.contains(image[dep], prereleases=True):
                errors.append(f"{name} needs {req}, the image has {dep} {image[dep]}")
        else:
            errors.append(f"{name} needs {req}: neither in .whl nor in the image")
for w in wheels:
    print(f"  {w.name}")
if errors:
    sys.exit("the wheel set is not complete:\n  " + "\n  ".join(errors))
print(f"  {len(wheels)} wheels, one per distribution; every requirement is carried or in the image")
PYEOF

PY312=""
for c in "$(command -v python3.12 || true)" "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12; do
    if [[ -n "$c" && -x "$c" ]] && "$c" -m pip --version >/dev/null 2>&1; then PY312="$c"; break; fi
done
if [[ -n "$PY312" ]]; then
    echo "== installing as the device does, into $("$PY312" -V 2>&1) ($PY312)"
    target="$(mktemp -d)"
    "$PY312" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$target" .whl/*.whl
    PYTHONPATH="$target" "$PY312" -c "import hjson, pydantic, pydantic_core, typing_inspection
from importlib.metadata import version
print('  imports: hjson', hjson.__version__, 'pydantic', pydantic.VERSION,
      'deepspeed', version('deepspeed'), '(import deepspeed itself needs torch: the device has it)')"
    if PYTHONPATH="$target" "$PY312" -c "import torch" 2>/dev/null; then
        PYTHONPATH="$target" "$PY312" -c "import deepspeed; print('  import deepspeed: ok')"
    fi
    rm -rf "$target"
else
    echo "== no Python 3.12 here: the device's install is checked by gpu_check.sh itself"
fi

whl_bytes=$(du -sb .whl | cut -f1)
tree_bytes=0
if git rev-parse --git-dir >/dev/null 2>&1; then
    tree_bytes=$(git ls-files -z --cached --others --exclude-standard |
        xargs -0 -r stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}')
fi
total=$((whl_bytes + tree_bytes))
limit=$((64 * 2**20))
awk -v w="$whl_bytes" -v t="$tree_bytes" 'BEGIN { m = 1048576; printf "== size: .whl %.1f MiB + working tree %.1f MiB = %.1f MiB of the 64 MiB the device tool sends\n", w / m, t / m, (w + t) / m }'
(( total < limit )) || { echo "too large for one device call" >&2; exit 1; }
cat <<EOF
== the device call (one call; the check ends within 480 s, the kill margin is 60 s):
  run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=540)
  then rebuild the report here: python benchmarks/gpu_table.py <files_at>/*.json <files_at>/pytest.xml
EOF
