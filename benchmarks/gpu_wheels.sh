#!/usr/bin/env bash
# The wheels the GPU check (benchmarks/gpu_check.py) needs on a GPU machine that has no network: what its image
# lacks (trl, datasets and the two of datasets' needs it lacks, dill and multiprocess) and what it may hold at
# another version than this checkout is tested with (peft; fsspec, which datasets caps). Each at the version
# installed in this checkout's venv, downloaded for CPython 3.12 on manylinux x86_64 into .whl/ (ignored by git).
#
#   benchmarks/gpu_wheels.sh        # the versions of .venv/bin/python's packages (PY=... names another python)
#   NO_PYARROW=1 benchmarks/gpu_wheels.sh    # without the pyarrow fallback (3 MB instead of 58)
#
# datasets also needs pyarrow >= 24, which the image has at a version nobody here has read: its wheel (~45 MB) goes
# to .whl/fallback/, installed there only when the image's is older (the device command in docs/performance.md).
#
# On the GPU machine, before the check (docs/performance.md, GPU):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
#   export PYTHONPATH=/tmp/site
# The image's own torch, transformers, accelerate, tokenizers, huggingface_hub, pandas, xxhash are used.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
PACKAGES="trl datasets peft dill multiprocess fsspec"

pins=$("$PY" - $PACKAGES <<'EOF'
import sys
from importlib.metadata import version
print(" ".join(f"{name}=={version(name)}" for name in sys.argv[1:]))
EOF
)
echo "wheels: $pins"
rm -rf .whl && mkdir -p .whl
# shellcheck disable=SC2086 - one argument per pin
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl $pins
[ -n "${NO_PYARROW:-}" ] && { du -sh .whl; exit 0; }  # when the carried tree would pass 64 MiB
mkdir -p .whl/fallback
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl/fallback "pyarrow==$("$PY" -c 'from importlib.metadata import version; print(version("pyarrow"))')"
ls -lR .whl
du -sh .whl
