# RAEE Serve image: the package, its CLI and server. Model weights are not baked in: the packaged
# GGUF is converted into the model cache volume on first start.
FROM python:3.11-slim
ARG PIP_EXTRA_ARGS=""
# torch==2.13.0 from the default index is a CUDA build on x86_64; pass a CPU wheel index in
# PIP_EXTRA_ARGS (e.g. --extra-index-url <your CPU wheel index>) for a smaller CPU image.
WORKDIR /app
COPY pyproject.toml README.md ./
COPY raee raee
COPY proto proto
RUN pip install --no-cache-dir $PIP_EXTRA_ARGS torch==2.13.0 && pip install --no-cache-dir $PIP_EXTRA_ARGS '.[server]'
# Bound to 0.0.0.0: the server refuses to start without RAEE_API_KEYS_FILE (or, on purpose,
# RAEE_ALLOW_UNAUTHENTICATED=1); docker-compose.yml mounts a key file as a secret.
ENV RAEE_DATA_DIR=/data RAEE_MODEL_CACHE=/models RAEE_ADDRESS=0.0.0.0:50051 RAEE_HTTP_ADDRESS=0.0.0.0:8080 HF_HUB_OFFLINE=1
EXPOSE 50051 8080 9464
CMD ["raee-server", "--metrics-port", "9464"]
