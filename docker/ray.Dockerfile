# The Ray image for the RayCluster and RayJob pods: rayproject/ray at our Ray version with this
# package and its pinned dependencies installed, so no job needs a per-job `pip` (and no egress).
# Build from the repository root (docs/gke.md, "Images"):
#   docker build -f docker/ray.Dockerfile -t REGION-docker.pkg.dev/PROJECT/t5ft/ray:2.60.0-py311 .
#   GPU workers: --build-arg VARIANT=-gpu and the tag ray:2.60.0-py311-gpu
# tests/test_docker.py checks that RAY_VERSION and the Python tag match pyproject.toml.
ARG RAY_VERSION=2.60.0
ARG PYTHON_TAG=py311
ARG VARIANT=
FROM rayproject/ray:${RAY_VERSION}-${PYTHON_TAG}${VARIANT}

# HOME is set by the rayproject/ray image (its ray user's home).
WORKDIR $HOME/t5x-ft-ray
# Only what `pip install .` packages ([tool.setuptools.packages.find] in pyproject.toml).
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users core core
COPY --chown=ray:users conversion conversion
COPY --chown=ray:users serving serving
COPY --chown=ray:users evaluation evaluation
COPY --chown=ray:users cluster cluster
COPY --chown=ray:users demo demo
COPY --chown=ray:users pipeline pipeline
COPY --chown=ray:users ray_jobs ray_jobs
# The exact pins of pyproject.toml; ray[default] is already the base image's own version.
# This is how our code reaches the Ray pods (no working_dir zip): rebuild to ship a change.
RUN pip install --no-cache-dir .
# The GPU variant (the `gpu` worker group's image) gets JAX for CUDA, pinned as pyproject.toml
# pins jax (tests/test_docker.py), so `evaluate --backend in-process` runs the engine on the
# group's GPUs; the CPU image keeps the CPU-only jaxlib.
ARG VARIANT
RUN if [ "$VARIANT" = "-gpu" ]; then \
        pip install --no-cache-dir "jax[cuda12]==0.10.2"; \
    fi
