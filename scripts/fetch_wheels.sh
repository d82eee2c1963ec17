#!/usr/bin/env bash
# Download the peer loaders' wheels (and the runtime deps the GPU image lacks) for the GPU machine's
# CPython 3.12 / x86-64 into .whl/ (git-ignored), plus the KServe predictor's (integrations/server) for
# tests/gpu/integrations.sh. tests/gpu/run.sh and integrations.sh install them with `pip --target`.
# The image already has torch, numpy, protobuf, psutil, typer, humanize, urllib3, python-dateutil, anyio, h11,
# httpx, click, uvloop, annotated-doc, ... (see the device notes), so those are left out.
# Versions are those of /work/venv. Usage: scripts/fetch_wheels.sh [PYTHON]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-${PYTHON:-/work/venv/bin/python}}
DEST=.whl
mkdir -p "$DEST"
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64 any; do
  PLATFORMS+=(--platform "$p")
done
PKGS=(
  tensorizer==2.12.1 fastsafetensors==0.5.0 runai-model-streamer==0.16.1 instanttensor==0.2.2
  # tensorizer's Requires-Dist that the image lacks (it imports boto3, redis and libnacl at import time)
  boto3==1.44.8 botocore==1.44.8 s3transfer==0.19.3 jmespath==1.1.0 redis==8.1.0 hiredis==3.5.0 libnacl==2.1.0
  # the inference server (FastAPI + uvicorn) and their Requires-Dist that the image lacks
  fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0
  typing-inspection==0.4.5 opentelemetry-api==1.45.2
  # the KServe predictor (kserve SDK 0.21) and its Requires-Dist (versions of the dev venv; the list printed
  # below is for checking them against the image, which was not done on a device yet)
  kserve==0.21.0 cloudevents==1.13.0 deprecation==2.1.0 grpc-interceptor==0.15.4 grpcio==1.85.4
  grpcio-tools==1.81.1 protobuf==6.33.6 orjson==3.13.0 pandas==2.3.3 pytz==2026.6 tzdata==2026.6
  prometheus-client==0.26.0 tabulate==0.10.0 timing-asgi==0.3.2 kubernetes==37.0.3 durationpy==0.12
  websocket-client==1.9.2 requests-oauthlib==2.0.0 oauthlib==4.0.1 google-auth==2.63.1 python-multipart==0.0.34
  pyjwt==2.15.1 watchfiles==1.3.0 httptools==0.9.0 websockets==17.4 python-dotenv==1.2.4 six==1.17.0
  aiohttp==3.14.5 aiohappyeyeballs==2.7.1 aiosignal==1.4.0 frozenlist==1.8.0 multidict==7.2.1 yarl==1.25.1
  propcache==0.5.4 psutil==5.9.8
  # the image has typing-extensions, maybe older than 4.16: pydantic-core imports its Sentinel (new in 4.16)
  typing-extensions==4.16.0
)
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${PLATFORMS[@]}" -d "$DEST" "${PKGS[@]}"
for f in "$DEST"/*.whl; do  # runtime needs of each wheel, for a manual check against the image's list
  echo "$(basename "$f"): $(unzip -p "$f" '*/METADATA' | grep '^Requires-Dist' | grep -v extra | cut -d' ' -f2- | tr '\n' ' ')"
done
du -sh "$DEST"
