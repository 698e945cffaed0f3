# The unimrg project image: the pipeline, the trainer and the Prefect/Dask tooling in one
# environment, so the Prefect server, workers and Dask processes all run the same versions.
#
#   docker compose build            # or: docker build -t unimrg:latest .
#
# PyPI's Linux x86_64 torch wheels are CUDA builds that carry their own CUDA runtime, so a plain
# Python base image is enough; the host needs only the NVIDIA driver and the NVIDIA Container
# Toolkit. To take torch from another wheel index (another CUDA version), pass
#   --build-arg PIP_EXTRA_INDEX_URL=<that index>
FROM python:3.11-slim

ARG PIP_EXTRA_INDEX_URL

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    UNIMRG_CACHE=/data/cache \
    HF_HOME=/data/huggingface

# libglib2.0-0: OpenCV (headless) links it; curl is not needed (health checks use Python).
RUN apt-get update \
    && apt-get install -y --no-install-recommends libglib2.0-0 \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app

# torch first, in its own layer: it is by far the largest and changes least often. Every install
# takes the versions pinned in constraints.txt (the environment CI tested).
COPY constraints.txt /app/constraints.txt
RUN pip install -c /app/constraints.txt torch torchvision

COPY . /app
RUN pip install -c /app/constraints.txt /app

# Outputs of the default manifest (output_dir: out) land on the `unimrg-data` volume.
RUN mkdir -p /data/out /data/cache /data/huggingface \
    && rm -rf /app/out && ln -s /data/out /app/out

CMD ["unimrg", "--help"]
