# kgpu: one image for the edge daemon (`kgpu edge run`) and the cloud controller (`kgpu cloud run`).
# No CUDA in the image: the nvidia container runtime mounts libnvidia-ml from the host driver
# (NVIDIA_DRIVER_CAPABILITIES=utility), which is all pynvml needs.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY kgpu ./kgpu
COPY edge ./edge
COPY cloud ./cloud
COPY shared ./shared
# Both sides, no lab: the edge extra (pynvml) and the cloud extra (kubernetes, alembic, psycopg);
# never kmock or a test library (the `lab` and `test` extras).
RUN pip install ".[edge,cloud]" && rm -rf /src

# Non-root by default (the controller runs as uid 10001). NVML reads work unprivileged; setting
# power limits and locking clocks do not: the edge DaemonSet (deploy/edge/daemonset.yaml)
# overrides this to root with CAP_SYS_ADMIN only, otherwise its power decisions are advisory.
RUN groupadd --system --gid 10001 kgpu \
    && useradd --system --uid 10001 --gid kgpu --home-dir /var/lib/kgpu --shell /usr/sbin/nologin kgpu \
    && mkdir -p /var/lib/kgpu && chown kgpu:kgpu /var/lib/kgpu
USER 10001:10001
WORKDIR /var/lib/kgpu

EXPOSE 9410 9420
ENTRYPOINT ["kgpu"]
CMD ["--help"]
