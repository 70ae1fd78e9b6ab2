# syntax=docker/dockerfile:1
# One image for every mailferry process: the compose file (and any orchestrator) picks the
# service with the command, e.g. `docker run IMAGE fetcher`, `docker run IMAGE db upgrade`.

# Build stage: the package and all its dependencies as wheels, so the runtime stage installs
# offline and carries neither the sources nor a build toolchain.
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# README.md* : pyproject.toml names it as the long description, but the build must not fail
# on a checkout without it.
COPY pyproject.toml README.md* ./
COPY shared/ shared/
COPY services/ services/
# shared/ is the package mailferry, services/ its mailferry.services (symlinks in the repo).
RUN ln -sfn shared mailferry && ln -sfn ../services shared/services \
    && pip wheel --wheel-dir /wheels .

FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# A fixed non-root uid: the processes only need the network, never to write to the image,
# and orchestrators checking runAsNonRoot need a numeric USER.
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/mailferry \
        --shell /usr/sbin/nologin mailferry
# Bind-mounted rather than copied: the wheels never become a layer of the final image.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-index --find-links=/wheels mailferry
USER 10001:10001
WORKDIR /home/mailferry
ENTRYPOINT ["mailferry"]
CMD ["--help"]
