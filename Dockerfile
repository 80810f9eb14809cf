# The datumflow image: the control plane (planner, committer, controller), the console and the
# worker.
# A pipeline's own image starts FROM this one and adds its code (see docs/kubernetes.md).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY datumflow ./datumflow
RUN pip install . && rm -rf /src

# A fixed non-root uid, so that `runAsNonRoot: true` can check it. /pfs is where the worker lays
# out datums (an emptyDir in the pod); it exists here too for `docker run` without a volume.
RUN useradd --uid 10001 --create-home --home-dir /home/datumflow datumflow \
    && mkdir /pfs && chown datumflow:datumflow /pfs
USER 10001
WORKDIR /home/datumflow

ENTRYPOINT ["datumflow"]
CMD ["--help"]
