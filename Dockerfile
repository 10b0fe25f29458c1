# syntax=docker/dockerfile:1.7
# One multi-target file, one image per service, plus the operators' `podium` command:
#   docker build --target ingress   --build-arg SERVICE=ingress   -t podium/ingress .
#   docker build --target conductor --build-arg SERVICE=conductor -t podium/conductor .
#   (worker and notifier alike; `--target cli --build-arg SERVICE=cli` for podium/cli,
#   which runs `podium provision` as a Job / compose one-shot and `podium replay`)
# Reproducible from uv.lock (uv sync --frozen --package podium-<SERVICE>: only that
# package and its locked dependencies); non-root (uid 10001); conductor and worker carry
# the Claude Code CLI pinned in tools/claude/package-lock.json.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ghcr.io/astral-sh/uv:0.13.9 AS uv

# --- dependencies and the service's packages, installed into /app/.venv -------------
FROM ${PYTHON_IMAGE} AS build
COPY --from=uv /uv /usr/local/bin/uv
ENV UV_COMPILE_BYTECODE=1 UV_LINK_MODE=copy UV_PYTHON_DOWNLOADS=never
WORKDIR /app
ARG SERVICE
# Every member's pyproject.toml: uv needs the whole workspace to read the lock.
COPY pyproject.toml uv.lock ./
COPY libs/contracts/pyproject.toml libs/contracts/
COPY libs/common/pyproject.toml libs/common/
COPY libs/agents/pyproject.toml libs/agents/
COPY libs/cli/pyproject.toml libs/cli/
COPY libs/testing/pyproject.toml libs/testing/
COPY libs/docgen/pyproject.toml libs/docgen/
COPY services/ingress/pyproject.toml services/ingress/
COPY services/conductor/pyproject.toml services/conductor/
COPY services/worker/pyproject.toml services/worker/
COPY services/notifier/pyproject.toml services/notifier/
COPY services/console/pyproject.toml services/console/
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev --no-install-workspace --package podium-${SERVICE}
COPY libs/ libs/
COPY services/ services/
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev --no-editable --package podium-${SERVICE}

# --- the Claude Code CLI (a native binary in its platform package) ---------------------
# Node 22 (maintenance LTS; 20 reached its end of life): only npm runs here.
FROM node:22-bookworm-slim AS claude
WORKDIR /opt/claude
COPY tools/claude/package.json tools/claude/package-lock.json ./
RUN npm ci --no-audit --no-fund --omit=dev \
 && cp "$(readlink -f node_modules/.bin/claude)" /usr/local/bin/claude

# --- runtime bases ---------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
# tini as PID 1: it forwards SIGTERM to the service and reaps the orphans that agent
# process groups leave (Python as PID 1 would keep them as zombies). The directories
# compose and Kubernetes mount volumes on exist, owned by the service's user, so a new
# volume takes that ownership (a missing mount point would be created root-owned).
RUN apt-get update && apt-get install -y --no-install-recommends tini \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --uid 10001 --user-group --home-dir /var/lib/podium --create-home podium \
 && install -d -o 10001 -g 10001 /var/lib/podium/state /var/lib/podium/workspaces \
      /var/lib/podium/outbox
ENV PATH=/app/.venv/bin:$PATH PYTHONUNBUFFERED=1 \
    PODIUM_STATE_DIR=/var/lib/podium/state PODIUM_WORKSPACE_ROOT=/var/lib/podium/workspaces
WORKDIR /var/lib/podium
USER 10001
EXPOSE 9090

FROM runtime AS agent-runtime
USER root
RUN apt-get update && apt-get install -y --no-install-recommends git ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=claude /usr/local/bin/claude /usr/local/bin/claude
USER 10001
ENV PODIUM_CLAUDE_BIN=/usr/local/bin/claude

# --- one target per service ------------------------------------------------------------
FROM runtime AS ingress
COPY --from=build --chown=10001:10001 /app/.venv /app/.venv
EXPOSE 8080
ENTRYPOINT ["tini", "--", "python", "-m", "podium.ingress"]

FROM runtime AS notifier
COPY --from=build --chown=10001:10001 /app/.venv /app/.venv
ENTRYPOINT ["tini", "--", "python", "-m", "podium.notifier"]

FROM agent-runtime AS conductor
COPY --from=build --chown=10001:10001 /app/.venv /app/.venv
ENTRYPOINT ["tini", "--", "python", "-m", "podium.conductor"]

FROM agent-runtime AS worker
USER root
# The agents' sandbox (podium.agents.sandbox): bubblewrap for the namespaces, socat for
# the sandbox's two local ports to the worker's egress proxy.
RUN apt-get update && apt-get install -y --no-install-recommends bubblewrap socat \
 && rm -rf /var/lib/apt/lists/*
USER 10001
COPY --from=build --chown=10001:10001 /app/.venv /app/.venv
ENTRYPOINT ["tini", "--", "python", "-m", "podium.worker"]

FROM runtime AS console
COPY --from=build --chown=10001:10001 /app/.venv /app/.venv
EXPOSE 8090
ENTRYPOINT ["tini", "--", "python", "-m", "podium.console"]

FROM runtime AS cli
COPY --from=build --chown=10001:10001 /app/.venv /app/.venv
ENTRYPOINT ["tini", "--", "podium"]
CMD ["status"]
