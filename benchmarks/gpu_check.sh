#!/usr/bin/env bash
# The GPU check on a machine without internet whose image has torch, accelerate and huggingface_hub but not
# diffusers or datasets: install the wheels carried in .whl/ into /tmp/site, print the versions that matter, run
# benchmarks/gpu_check.py writing report.md, report.json and gpu_check.log to $OUT (default: gpu_out).
#
# Prepare the wheels once, on a machine with pip access (Python 3.12 on the GPU machine; see BENCHMARKS.md):
#   bash benchmarks/gpu_check.sh --download
# and the real images of the quality section (Twemoji at 32 px, ~15 MB; carry .bench_data/twemoji-32px only):
#   python -c "from benchmarks.recipe import prepare; prepare('twemoji', '.bench_data')"
# Then, on the GPU machine, from the repo root (with .whl and .bench_data/twemoji-32px carried along):
#   bash benchmarks/gpu_check.sh [extra gpu_check.py flags, e.g. --budget-s 420 or --sections memory cli]
set -uo pipefail
cd "$(dirname "$0")/.."

# diffusers and datasets, plus what they need that the GPU image lacks (dill, multiprocess, importlib_metadata and
# its lazy-importer) or may hold in a version datasets refuses (fsspec <= 2026.9.0). The versions are the ones the
# CPU tests ran with. pyarrow (datasets needs >= 24; 52 MiB) is only added with WITH_PYARROW=1.
WHEELS=(diffusers==0.42.1 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 importlib_metadata==10.2.0
        lazy-importer==0.1.0 fsspec==2026.9.0)
# The notebook section runs the notebook in a Jupyter kernel: nbclient, ipykernel, IPython, ipywidgets and what they
# need that the image lacks (about 17 MB).
WHEELS+=(nbclient==0.11.0 nbformat==5.11.1 ipykernel==7.4.0 ipython==8.12.3 jupyter_client==8.10.0
         jupyter_core==5.9.1 traitlets==5.15.0 pyzmq==27.3.0 tornado==6.6.1 comm==0.2.3 debugpy==1.8.22
         matplotlib-inline==0.2.2 platformdirs==4.14.9 decorator==5.2.1 jedi==0.20.0 parso==0.8.7
         prompt_toolkit==3.0.52 wcwidth==0.7.0 pexpect==4.8.0 ptyprocess==0.7.0 stack_data==0.6.3 asttokens==3.0.1
         executing==2.2.1 pure_eval==0.2.3 fastjsonschema==2.22.3 jsonschema==4.26.0
         jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==0.30.0 ipywidgets==8.1.9
         widgetsnbextension==4.0.16 jupyterlab_widgets==3.0.17 backcall==0.2.0 pickleshare==0.7.5
         nest-asyncio2==1.7.4)

if [[ "${1:-}" == "--download" ]]; then
    [[ "${WITH_PYARROW:-0}" == 1 ]] && WHEELS+=(pyarrow==26.0.1)
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "${WHEELS[@]}" || exit 1
    du -ch .whl/*.whl | tail -1
    exit 0
fi

OUT="${OUT:-gpu_out}"
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "error: installing the carried wheels from .whl/ failed (run with --download first)"; exit 1; }
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1

python3 - <<'EOF' 2>&1 | tee "$OUT/gpu_check.log" || { echo "error: the imports above failed; nothing measured"; exit 1; }
import importlib.metadata as m, torch
print("torch", torch.__version__, "| cuda", torch.version.cuda, "|", torch.cuda.get_device_name() if torch.cuda.is_available() else "NO CUDA")
for name in ("diffusers", "datasets", "accelerate", "huggingface_hub", "pyarrow", "fsspec", "numpy", "safetensors"):
    try:
        print(f"{name} {m.version(name)}")
    except m.PackageNotFoundError:
        print(f"{name} MISSING")
import diffusers, datasets, liquid_diffusion.trainer  # fail here, in seconds, rather than inside a section
EOF
python3 -m benchmarks.gpu_check --out-dir "$OUT" --work-dir /tmp/gpu_check_work "$@" 2>&1 | tee -a "$OUT/gpu_check.log"
