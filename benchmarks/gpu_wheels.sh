#!/usr/bin/env bash
# Download into .whl/ the wheels that the GPU machine lacks for the peers of bench_step.py and
# bench_e2e.py (sae-lens, eai-sparsify and their dependencies missing from its image, Python
# 3.12, x86-64), so that `make bench-gpu` can unpack them there. Versions: those of the CPU
# peers venv (benchmarks/setup_peers.sh). Run here, before carrying .whl to the GPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> "$(git rev-parse --git-path info/exclude)"
PKGS="annotated-types==0.8.0 babe==0.0.7 beartype==0.23.1 better-abc==0.0.3 config2py==0.1.76
cwevals==0.0.1b1 datasets==5.2.0 defusedxml==0.7.1 dill==0.4.1 distro==1.9.0
docstring-parser==0.18.0 dol==0.3.100 eai-sparsify==1.3.3 fancy-einsum==0.0.3
googleapis-common-protos==1.76.0 graze==0.1.46 httpcore2==2.16.2 httpx2==2.16.2 i2==0.1.91
importlib-resources==7.1.0 multiprocess==0.70.19 natsort==8.4.0 nltk==3.10.4
opentelemetry-api==1.45.2 opentelemetry-exporter-http-transport==0.66b2
opentelemetry-exporter-otlp-common==0.66b2 opentelemetry-exporter-otlp-proto-common==1.45.2
opentelemetry-exporter-otlp-proto-http==1.45.2 opentelemetry-proto==1.45.2
opentelemetry-sdk==1.45.2 opentelemetry-semantic-conventions==0.66b2 platformdirs==4.14.9
plotly==7.1.0 plotly-express==0.4.1 py2store==0.1.24 pydantic==2.14.4 pydantic-core==2.50.5
python-dotenv==1.2.4 sae-lens==6.54.12 schedulefree==1.4.1 simple-parsing==0.1.9 sniffio==1.3.1
tenacity==9.2.1 transformer-lens==3.9.0 transformers-stream-generator==0.0.5 truststore==0.10.5
typeguard==4.6.1 typing-inspection==0.4.5 tzdata==2026.6 wandb==0.31.0"
PLAT=""
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
         manylinux1_x86_64 manylinux_2_24_x86_64 manylinux_2_31_x86_64 manylinux_2_34_x86_64; do
  PLAT="$PLAT --platform $p"
done
mkdir -p .whl
for spec in $PKGS; do
  ls .whl | grep -qi "^$(echo "${spec%%==*}" | tr - _)-${spec##*==}-" && continue
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp $PLAT -d .whl "$spec" \
  || python3 -m pip download -q --no-deps --no-binary=:none: -d .whl "$spec"
done
du -sh .whl
