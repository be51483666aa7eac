#!/usr/bin/env bash
# Download the wheels that the GPU machine lacks into .whl/ (git-ignored), for benchmarks/gpu_check.py.
#
# The device machine (python 3.12, x86-64, no network) already has torch, torchvision, timm, numpy, pyarrow,
# fsspec, typer, rich, safetensors, pillow, scikit-learn, matplotlib, attrs, click, cloudpickle, pyyaml, toolz,
# packaging and typing-extensions (/work/.library/device/KINDS.md), but not the store's stack: zarr, numcodecs,
# dask, jsonschema, nor their own needs listed below. Run this here, where pip reaches the index:
#
#     bash benchmarks/fetch_wheels.sh [--distributed]     # --distributed: also dask.distributed and its needs
#
# Versions are pinned to what the development venv (.venv) holds; the script warns when they differ. One
# version of each package only (two stop the install there). On the device (carry [".whl"]):
#
#     python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
#         .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
set -euo pipefail

cd "$(dirname "$0")/.."
DEST=.whl

# name==version, each a dependency missing on the device machine (Requires-Dist, `extra` lines skipped):
WHEELS=(
  zarr==3.1.6                       # donfig, google-crc32c, numcodecs, numpy, packaging, typing-extensions
  numcodecs==0.16.6                 # numpy, typing_extensions
  donfig==0.8.1.post1               # pyyaml
  google-crc32c==1.9.0
  dask==2026.8.0                    # click, cloudpickle, fsspec, packaging, partd, pyyaml, toolz (importlib_metadata < 3.12 only)
  partd==1.4.2                      # locket, toolz
  locket==1.0.0
  jsonschema==4.26.0                # attrs, jsonschema-specifications, referencing, rpds-py
  jsonschema-specifications==2025.9.1
  referencing==0.37.0               # attrs, rpds-py, typing-extensions
  rpds-py==2026.9.1
)
if [[ "${1:-}" == "--distributed" ]]; then
  # click, cloudpickle, jinja2, msgpack, psutil, pyyaml, sortedcontainers, toolz, urllib3 are on the device already
  WHEELS+=(distributed==2026.8.0 tornado==6.6.1 zict==3.0.0 tblib==3.2.2)
fi

# Warn (do not fail) when the development venv holds other versions than the pins above.
if [[ -x .venv/bin/python ]]; then
  .venv/bin/python - "${WHEELS[@]}" <<'EOF' || true
import sys
from importlib.metadata import PackageNotFoundError, version
for spec in sys.argv[1:]:
    name, pinned = spec.split("==")
    try:
        have = version(name)
    except PackageNotFoundError:
        have = None
    if have != pinned:
        print(f"warning: {name} is pinned to {pinned} here but .venv has {have}", file=sys.stderr)
EOF
fi

mkdir -p "$DEST"
# The device README's recipe: CPython 3.12 manylinux x86-64 wheels only, no dependency resolution.
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d "$DEST" "${WHEELS[@]}"

# Exactly one wheel per pinned package (a stale other version would stop the install on the device).
status=0
for spec in "${WHEELS[@]}"; do
  name=${spec%%==*}
  stem=$(echo "$name" | tr '-' '_')
  found=$(ls "$DEST" | grep -i -E "^${stem}-[0-9]" || true)
  count=$(printf '%s' "$found" | grep -c . || true)
  if [[ "$count" != 1 ]]; then
    echo "error: expected one wheel of $name in $DEST, found $count: $found" >&2
    status=1
  fi
done
echo "wheels in $DEST:"
ls -1 "$DEST"
du -ch "$DEST"/*.whl | tail -1
exit $status
