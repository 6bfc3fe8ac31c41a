# The streaming-pull worker (python -m detector worker), for a Cloud Run worker pool
# (deploy.sh --worker) or any container platform such as GKE. Only the online detector goes
# in: requirements.txt and detector/ without detector/offline, tests or build artefacts
# (.dockerignore). The C parts are not built here; the detector runs them in pure Python,
# with the same verdicts.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY requirements.txt .
RUN pip install -r requirements.txt
COPY detector/ detector/

# An unprivileged user with a numeric id, so platforms that require non-root
# (runAsNonRoot on GKE) can check it without resolving the name.
RUN useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin detector
USER 10001

# The subscriptions are arguments: deploy.sh passes --args; a Kubernetes pod sets args.
# The environment (GOOGLE_CLOUD_PROJECT, RESULTS_TOPIC, DEAD_LETTER_TOPIC,
# FEEDBACK_DEAD_LETTER_TOPIC, REDIS_URL, ...) is the same as the functions'. With PORT set
# the worker serves GET /healthz there.
ENTRYPOINT ["python", "-m", "detector", "worker"]
CMD ["--subscription", "fraud-worker", "--feedback-subscription", "fraud-worker-feedback"]
