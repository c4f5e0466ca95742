#!/usr/bin/env bash
# Build benchmarks/.venv (gitignored) for benchmarks/hessian.py: whybn + PyHessian 0.1 + curvlinops 3.0.1.
# These are benchmark-only packages; never add them to the project's dependencies.
# Usage: bash benchmarks/setup.sh   (from anywhere; PYTHON=python3.11 to choose the interpreter)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
V="$here/.venv"
"${PYTHON:-python3}" -m venv "$V"
"$V/bin/pip" install torch==2.13.0
"$V/bin/pip" install -r "$root/requirements.txt"
"$V/bin/pip" install einops unfoldNd einconv linear_operator opt-einsum
# --no-deps: otherwise backpack -> torchvision replaces the CPU torch with a CUDA build.
"$V/bin/pip" install --no-deps backpack-for-pytorch==1.7.1 curvlinops-for-pytorch==3.0.1
"$V/bin/pip" install pyhessian==0.1
"$V/bin/pip" install -q --no-deps --no-build-isolation -e "$root"
echo "ready: $V/bin/python benchmarks/hessian.py --quick"
