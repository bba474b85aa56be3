# agentproxy container image: `docker build -t agentproxy:0.1.0 .`
#
# Two stages: the builder has compilers (for any dependency without a wheel for this platform),
# builds the project's wheel and installs it into a venv; the final image copies that venv
# only. It runs as UID 10001 and writes nothing outside its volumes, so it runs with a
# read-only root filesystem: give it a writable /tmp (`--tmpfs /tmp`, or the Helm chart's
# emptyDir) and mount the config at /etc/agentproxy/agentproxy.yaml (keys and secrets too,
# as files: none are baked into the image).
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS builder
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml setup.py MANIFEST.in README.md ./
# The wheel build generates agentproxy.v1 from proto/ (grpcio-tools, a build requirement).
COPY proto/ proto/
COPY src/ src/
RUN python -m pip wheel --no-deps --wheel-dir /wheels . \
    && python -m venv /opt/agentproxy \
    && /opt/agentproxy/bin/pip install /wheels/agentproxy-*.whl

# Same base as the builder: the venv's python is a symlink to /usr/local/bin/python3.11.
FROM ${PYTHON_IMAGE}
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/agentproxy/bin:$PATH
RUN groupadd --system --gid 10001 agentproxy \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin agentproxy \
    && mkdir -p /etc/agentproxy /var/log/agentproxy \
    && chown 10001:10001 /var/log/agentproxy
COPY --from=builder /opt/agentproxy /opt/agentproxy
# Audit files go here (contract: audit.file); the only place the proxy writes besides /tmp.
VOLUME ["/var/log/agentproxy"]
USER 10001
# 8080: data plane; 9901: admin (/metrics, /healthz, /readyz, /.well-known/jwks.json);
# 50051 and 9902: the gRPC data plane and agentproxy.v1 APIs, when listen.grpc/admin_grpc set.
EXPOSE 8080 9901 50051 9902
# slim has no curl: Python's urllib (it raises, so exits non-zero, on any status but 2xx).
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9901/healthz', timeout=2)"]
ENTRYPOINT ["agentproxy"]
CMD ["run", "--config", "/etc/agentproxy/agentproxy.yaml"]
