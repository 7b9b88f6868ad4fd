# The serving image: a public Triton release + JAX for CUDA + this package. Triton's Python
# backend runs our JAX engine (serving/triton_model/model.py), moving tensors through DLPack,
# the path that works under numpy 2 (docs/triton-numpy2.md). It is the GKE default
# (triton.image, backend: python); convert with `engine: jax`.
# Build from the repository root (docs/gke.md, "Images"):
#   docker build -f docker/serving.Dockerfile -t REGION-docker.pkg.dev/PROJECT/t5ft/serving:0.1.0 .
# 24.12 is Ubuntu 24.04 with Python 3.12 and CUDA 12.6 (NVIDIA's release notes for Triton 24.12),
# which this package supports (requires-python), and reads gs:// repositories with Workload
# Identity credentials (fixed in 23.03: triton-inference-server/server #5039, #5567).
# tests/test_docker.py checks the jax pin against pyproject.toml.
ARG TRITON_RELEASE=24.12
FROM nvcr.io/nvidia/tritonserver:${TRITON_RELEASE}-py3

WORKDIR /opt/t5x-ft-ray
COPY pyproject.toml README.md ./
COPY core core
COPY conversion conversion
COPY serving serving
COPY evaluation evaluation
COPY cluster cluster
COPY demo demo
COPY pipeline pipeline
COPY ray_jobs ray_jobs
# The system Python is the one Triton's Python-backend stub embeds, so the package goes there
# (Ubuntu 24.04 marks it externally managed, hence --break-system-packages).
RUN python3 -m pip install --no-cache-dir --break-system-packages \
        "jax[cuda12]==0.10.2" . \
    && rm -rf /opt/t5x-ft-ray
# The image's non-root user (uid 1000), as the Deployment runs it (triton.run_as_user: 1000).
USER 1000
