# gradprobe gRPC service, CUDA-capable.
#
#   docker build -t gradprobe .
#   docker run --gpus all -p 50051:50051 gradprobe            # GPU via the NVIDIA toolkit
#   docker run -p 50051:50051 gradprobe serve --host 0.0.0.0 --workers 4 --device cpu
#
# PyPI's default Linux torch wheel is a CUDA build that brings its CUDA libraries as nvidia-*
# wheels, so a plain Python base image runs on GPUs once the NVIDIA container toolkit mounts the
# driver. The install mirrors `make setup` (README, CI): torch pinned first, then the project;
# here non-editable and without the dev extras.

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
# torch first, in its own layer: it is most of the image and changes least often.
RUN /opt/venv/bin/python -m pip install --upgrade pip \
 && /opt/venv/bin/python -m pip install "torch==2.14.1" "torchvision==0.29.1"
COPY pyproject.toml README.md /src/
COPY gradprobe /src/gradprobe
COPY diagnostics /src/diagnostics
COPY server /src/server
COPY client /src/client
RUN /opt/venv/bin/python -m pip install /src

FROM ${PYTHON_IMAGE} AS runtime
# Only the virtual environment crosses over: no sources, no pip cache, no build backend.
COPY --from=build /opt/venv /opt/venv
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin gradprobe \
 && mkdir -p /var/lib/gradprobe \
 && chown gradprobe:gradprobe /var/lib/gradprobe
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER gradprobe
WORKDIR /home/gradprobe
# Uploaded models (content-addressed); mount a volume here to keep them across restarts.
VOLUME ["/var/lib/gradprobe"]
EXPOSE 50051
# Prometheus metrics (--metrics-port), plain HTTP: /metrics
EXPOSE 9090
# The standard gRPC health service; it needs no token. With --tls-cert, add
# --tls-ca (and --tls-server-name) to this command.
HEALTHCHECK --interval=30s --timeout=20s --start-period=180s --retries=3 \
    CMD ["python", "-m", "gradprobe.server.healthcheck", "--address", "127.0.0.1:50051"]
# Exec form: gradprobe is PID 1 and gets SIGTERM itself, drains in-flight probes, exits 0.
ENTRYPOINT ["gradprobe"]
CMD ["serve", "--host", "0.0.0.0", "--port", "50051", "--metrics-port", "9090", "--store-dir", "/var/lib/gradprobe/store"]
