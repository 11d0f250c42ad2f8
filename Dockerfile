# RAEE Serve image: the package, its CLI and server. Model weights are not baked in: the packaged
# GGUF is converted into the model cache volume on first start.
#
# Two stages: the first builds a virtual environment, dependencies before sources (a code change
# does not reinstall torch); the second copies it into a clean image that runs as a non-root user.
FROM python:3.11-slim AS build
ARG PIP_EXTRA_ARGS=""
# torch==2.13.0 from the default index is a CUDA build on x86_64; pass a CPU wheel index in
# PIP_EXTRA_ARGS (e.g. --extra-index-url <your CPU wheel index>) for a smaller CPU image.
RUN python -m venv /venv
ENV PATH=/venv/bin:$PATH PIP_NO_CACHE_DIR=1
RUN pip install $PIP_EXTRA_ARGS torch==2.13.0
WORKDIR /src
# The dependencies of '.[server]', read from pyproject.toml alone, then the sources: built into a wheel,
# and the wheel installed (what users install; the image never runs the checkout).
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
print('\n'.join(p['dependencies'] + p['optional-dependencies']['server']))" > requirements.txt \
    && pip install $PIP_EXTRA_ARGS -r requirements.txt
COPY raee_server raee_server
COPY migrations migrations
RUN pip wheel --no-deps --wheel-dir /wheels . && pip install --no-deps /wheels/raee_serve-*.whl

FROM python:3.11-slim
RUN useradd --create-home --uid 10001 raee && mkdir /data /models && chown raee:raee /data /models
COPY --from=build /venv /venv
# Bound to 0.0.0.0: the server refuses to start without RAEE_API_KEYS_FILE (or, on purpose,
# RAEE_ALLOW_UNAUTHENTICATED=1); docker-compose.yml mounts a key file as a secret.
ENV PATH=/venv/bin:$PATH RAEE_DATA_DIR=/data RAEE_MODEL_CACHE=/models RAEE_ADDRESS=0.0.0.0:50051 \
    RAEE_HTTP_ADDRESS=0.0.0.0:8080 RAEE_METRICS_ADDRESS=0.0.0.0 HF_HUB_OFFLINE=1
USER raee
WORKDIR /home/raee
EXPOSE 50051 8080 9464
# Readiness (models loaded, stores reachable); the first start converts the GGUF (minutes).
HEALTHCHECK --interval=10s --timeout=5s --start-period=180s --retries=30 \
    CMD ["raee-admin", "health", "--server", "127.0.0.1:50051"]
CMD ["raee-server", "--metrics-port", "9464"]
