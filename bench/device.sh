#!/usr/bin/env bash
# The GPU measurements on a machine lent through the device tool: torch with CUDA, no diffusers, no
# tritonserver, no registry, 64 MiB carried per call and a short time (../shared/FACTS.md).
#
# Here (registry access), once:   bash bench/device.sh wheels
#   .whl/: every package of env/serving.lock but torch and what torch brings (the device's CUDA torch
#   stays), and peft: the production versions of diffusers, transformers, huggingface_hub, numpy<2
#   (the backend stub needs it), ... (60 MB). .whl-triton/: nvidia-pytriton (tritonserver). Both git-ignored through
#   .git/info/exclude. Too big for one call together.
# There, two calls in a row (what one call installs stays in /tmp while the machine is warm):
#   carry [".whl"]:         bash bench/device.sh run     make bench-gpu (full-size random weights)
#   carry [".whl-triton"]:  bash bench/device.sh serve   the four models served by tritonserver, called
#                                                        with the AWS sample's payloads (bench/served.py)
#   bench-gpu's sections no longer fit one call: run it twice, e.g. BENCH_ARGS="--skip artifacts" then
#   BENCH_ARGS="--skip batching schedulers adapters models upscale-limit --compile none --rounds 1"
#   (the artifacts table: each compile mode built cold, then cold loads in fresh processes). For
#   issue 16's serving row: BENCH_ARGS="--set sync_free=true cuda_graphs=true" bash bench/device.sh serve.
#   Each writes its report and log under $OUT and prints rows as they are measured, so a run cut short
#   keeps what it measured. BENCH_ARGS passes options (e.g. "--compile none --repeats 1"); BENCH_TIMEOUT
#   (seconds, default 540) stops it inside a 600 s call.
# Both run in a venv (DEVICE_VENV, /tmp/sdmme-venv by default): the carried wheels, this checkout, and
# from DEVICE_PYTHON only what the lock names and no wheel brought, i.e. torch and its own
# (bench/device_site.py; the device's other packages expect its numpy 2). The backend stub ignores
# PYTHONPATH and imports from the venv whose python3 is first on PATH: the models see what the bench sees.
# Without CUDA, DEVICE_PYTHON=.venv/bin/python and tiny settings in BENCH_ARGS run the same steps on CPU
# (tests/test_bench.py, with DEVICE_WHEELS= empty: wheels fetched here are for the device's Python).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${DEVICE_PYTHON:-python3}
venv=${DEVICE_VENV:-/tmp/sdmme-venv}
carried=${DEVICE_WHEELS-.whl*/*.whl}  # the wheels a call carried (empty: none, as in the tests)
out=${OUT:-out/device}
# torch and what it brings: the device's own, never carried
TORCH_AND_ITS_OWN='^(torch|triton|xformers|nvidia-[a-z0-9-]+|sympy|mpmath|networkx|jinja2|markupsafe|setuptools|typing_extensions|filelock|fsspec)=='

download() {  # folder, requirements... (the folder holds exactly these: a call installs all it carries)
    local folder=$1
    shift
    rm -rf "$folder"
    grep -qx "/$folder/" .git/info/exclude 2>/dev/null || echo "/$folder/" >>.git/info/exclude
    "$python" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_35_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d "$folder" "$@"
}

install_carried() {
    if [ ! -x "$venv/bin/python" ]; then
        "$python" -m venv --without-pip "$venv"
    fi
    local site wheels=""
    site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
    [ -z "$carried" ] || wheels=$(compgen -G "$carried" || true)
    if [ -n "$wheels" ]; then
        # shellcheck disable=SC2086  # one word per wheel
        "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$site" $wheels
    fi
    # this checkout, then what the venv lacks of the lock from DEVICE_PYTHON (torch and its own), only that
    rm -rf "$venv/device-site"
    "$python" -m bench.device_site env/serving.lock "$site" "$venv/device-site"
    printf '%s\n' "$PWD" "$venv/device-site" >"$site/sdmme.pth"
    python="$venv/bin/python"
    export PYTHONUNBUFFERED=1
    mkdir -p "$out"
    { nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true; } | tee "$out/gpu.txt"
    "$python" -c 'from importlib.metadata import version as v
print(", ".join(f"{p} {v(p)}" for p in ("torch", "diffusers", "transformers", "huggingface_hub", "numpy")))' |
        tee -a "$out/gpu.txt"
}

case "${1:-}" in
wheels)
    # shellcheck disable=SC2046  # one word per package
    # and peft (make adapter's reading of LoRAs, and bench-gpu's unfused row; serving needs none)
    download .whl $(grep -v '^#' env/serving.lock | grep -v -E "$TORCH_AND_ITS_OWN") $(grep '^peft==' env/dev.lock)
    download .whl-triton "nvidia-pytriton==$("$python" -m pip show nvidia-pytriton | sed -n 's/^Version: //p')"
    du -sh .whl .whl-triton
    ;;
venv)
    install_carried  # only the venv (tests/test_bench.py)
    ;;
run)
    install_carried
    # shellcheck disable=SC2086  # BENCH_ARGS is a list of options
    timeout "${BENCH_TIMEOUT:-540}" "$python" -m bench.gpu --out "$out/benchmarks.md" \
        --weights-cache /tmp/sdmme-weights ${BENCH_ARGS:-} 2>&1 | tee "$out/bench.log"
    ;;
serve)
    install_carried
    "$python" -c "import numpy, sys; sys.exit(numpy.__version__ >= '2')" || {
        echo "numpy<2 is not installed in $venv (the stub crashes on BYTES with numpy 2): call 'run' with .whl first, on the same warm machine" >&2
        exit 2
    }
    # shellcheck disable=SC2086
    timeout "${BENCH_TIMEOUT:-540}" "$python" -m bench.served --out "$out/served.md" \
        --repository /tmp/sdmme-weights ${BENCH_ARGS:-} 2>&1 | tee "$out/served.log"
    ;;
*)
    echo "usage: bash bench/device.sh wheels|venv|run|serve" >&2
    exit 2
    ;;
esac
