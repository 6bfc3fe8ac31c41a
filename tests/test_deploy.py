"""deploy.sh: dry-run output, gcloud flag check, emulator provisioning, packaged source, errors.

Nothing here ever talks to Google Cloud: every run of deploy.sh gets an empty CLOUDSDK_CONFIG
(no account), real-project runs are dry runs or fail at their first gcloud call, and the flag
check additionally disables the GCE metadata lookup and routes HTTP to a dead proxy.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

import pytest
import requests

from stack import services

ROOT = services.ROOT
DEPLOY = ROOT / "deploy.sh"
PROJECT = "fraud-test"
NO_ACCOUNT = "You do not currently have an active account selected"
# The tools deploy.sh uses besides gcloud, for runs with a PATH that has no gcloud.
TOOLS = (
    "bash", "env", "dirname", "basename", "mktemp", "rm", "mkdir", "cp", "cat", "ls", "tar",
    "find", "sort", "sha256sum", "cut", "awk", "grep", "sed", "tr", "tail", "sleep",
)  # fmt: skip


def run_deploy(
    *args: str,
    config: Path,
    path: str | None = None,
    timeout: float = 300,
    script: Path = DEPLOY,
    offline: bool = False,
) -> subprocess.CompletedProcess[str]:
    """Run deploy.sh with a fresh, empty gcloud configuration (no account, no credentials)."""
    config.mkdir(parents=True, exist_ok=True)
    env = {
        "PATH": path if path is not None else os.environ["PATH"],
        "HOME": str(config),
        "CLOUDSDK_CONFIG": str(config),
        "CLOUDSDK_CORE_CHECK_GCE_METADATA": "false",
        "LC_ALL": "C.UTF-8",
    }
    if offline:  # real-project runs: whatever gcloud tries, it cannot reach anything
        env.update(
            CLOUDSDK_PROXY_TYPE="http", CLOUDSDK_PROXY_ADDRESS="127.0.0.1", CLOUDSDK_PROXY_PORT="9"
        )
    return subprocess.run(
        [str(script), *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def dry_run(tmp_path: Path, *args: str, mask: bool = True) -> str:
    """stdout of a successful dry run; mask replaces the config digests (they follow the source)."""
    result = run_deploy("--dry-run", *args, config=tmp_path / "gcloud")
    assert result.returncode == 0, result.stderr
    assert "ran none" in result.stderr
    if not mask:
        return result.stdout
    return re.sub(r"config_digest=[0-9a-f]{32}", "config_digest=DIGEST", result.stdout)


def gcloud_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("gcloud ")]


def tools_path(tmp_path: Path) -> str:
    """A PATH directory with the shell tools deploy.sh needs and no gcloud."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in TOOLS:
        found = shutil.which(tool)
        assert found is not None, f"{tool} is needed by deploy.sh"
        (bin_dir / tool).symlink_to(found)
    return str(bin_dir)


def sa(role: str) -> str:
    return f"fraud-detector-{role}@fraud-proj.iam.gserviceaccount.com"


AGENT = "serviceAccount:service-PROJECT_NUMBER@gcp-sa-pubsub.iam.gserviceaccount.com"
POLICY = "'--flatten=bindings[].members' '--format=csv[no-heading](bindings.role,bindings.members)'"
TOPICS_LIST = "'--format=csv[no-heading](name.basename(),schemaSettings.schema.basename(),schemaSettings.encoding)'"
SUBS_LIST = "'--format=csv[no-heading](name.basename(),topic.basename(),pushConfig.pushEndpoint,deadLetterPolicy.deadLetterTopic.basename(),deadLetterPolicy.maxDeliveryAttempts,retryPolicy.minimumBackoff,retryPolicy.maximumBackoff)'"
SUB_POLICY = "'--format=csv[no-heading](deadLetterPolicy.deadLetterTopic.basename(),deadLetterPolicy.maxDeliveryAttempts,retryPolicy.minimumBackoff,retryPolicy.maximumBackoff)'"
SIZES = "--memory=512Mi --cpu=1 --concurrency=8 --max-instances=10 --min-instances=0 --timeout=60s"
ENV = (
    "--set-env-vars=GOOGLE_CLOUD_PROJECT=fraud-proj,RESULTS_TOPIC=fraud-verdicts,"
    "DEAD_LETTER_TOPIC=transactions-dead-letter,MAX_DELIVERY_ATTEMPTS=10"
)
SECRET = "--set-secrets=REDIS_URL=fraud-redis-url:latest"
HEAD = "--gen2 --project=fraud-proj --region=europe-west1 --runtime=python311 --source={staging}"
# The password is part of the test: it must never appear in anything deploy.sh prints.
PASSWORD = "Pa55-w0rd-never-printed"
REDIS_URL = f"rediss://:{PASSWORD}@10.0.0.3:6378/0"
DEPLOY_ARGS = ("--project", "fraud-proj", "--region", "europe-west1", "--redis-url", REDIS_URL)

EXPECTED_DEPLOY = f"""\
# stage the function source in {{staging}} (done locally, also in a dry run)
# enable APIs
gcloud services list --enabled --project=fraud-proj '--format=value(config.name)'
gcloud services enable cloudfunctions.googleapis.com run.googleapis.com cloudbuild.googleapis.com eventarc.googleapis.com pubsub.googleapis.com artifactregistry.googleapis.com iam.googleapis.com secretmanager.googleapis.com --project=fraud-proj
# find the Pub/Sub service agent
gcloud projects describe fraud-proj '--format=value(projectNumber)'
# topics
gcloud pubsub topics list --project=fraud-proj {TOPICS_LIST}
gcloud pubsub topics create transactions fraud-verdicts transactions-dead-letter fraud-feedback fraud-feedback-dead-letter --project=fraud-proj
# dead-letter subscriptions
gcloud pubsub subscriptions list --project=fraud-proj {SUBS_LIST}
gcloud pubsub subscriptions create transactions-dead-letter-keep --project=fraud-proj --topic=transactions-dead-letter --expiration-period=never
gcloud pubsub subscriptions create fraud-feedback-dead-letter-keep --project=fraud-proj --topic=fraud-feedback-dead-letter --expiration-period=never
# service accounts
gcloud iam service-accounts list --project=fraud-proj '--format=value(email)'
gcloud iam service-accounts create fraud-detector-detect --project=fraud-proj '--display-name=Fraud detector: detect' '--description=Identity of the fraud detector detect workload; created by deploy.sh'
gcloud iam service-accounts create fraud-detector-feedback --project=fraud-proj '--display-name=Fraud detector: feedback' '--description=Identity of the fraud detector feedback workload; created by deploy.sh'
gcloud iam service-accounts create fraud-detector-score --project=fraud-proj '--display-name=Fraud detector: score' '--description=Identity of the fraud detector score workload; created by deploy.sh'
gcloud iam service-accounts create fraud-detector-push --project=fraud-proj '--display-name=Fraud detector: push' '--description=Identity of the fraud detector push workload; created by deploy.sh'
# shared state
gcloud secrets list --project=fraud-proj '--format=value(name.basename())'
gcloud secrets create fraud-redis-url --project=fraud-proj --replication-policy=automatic --labels=managed_by=deploy_sh --data-file=-
gcloud secrets versions describe latest --secret=fraud-redis-url --project=fraud-proj '--format=csv[no-heading](name.basename(),state)'
gcloud secrets get-iam-policy fraud-redis-url --project=fraud-proj {POLICY}
gcloud secrets add-iam-policy-binding fraud-redis-url --project=fraud-proj --member=serviceAccount:{sa("detect")} --role=roles/secretmanager.secretAccessor
gcloud secrets add-iam-policy-binding fraud-redis-url --project=fraud-proj --member=serviceAccount:{sa("feedback")} --role=roles/secretmanager.secretAccessor
gcloud secrets add-iam-policy-binding fraud-redis-url --project=fraud-proj --member=serviceAccount:{sa("score")} --role=roles/secretmanager.secretAccessor
# publish permissions
gcloud pubsub topics get-iam-policy fraud-verdicts --project=fraud-proj {POLICY}
gcloud pubsub topics add-iam-policy-binding fraud-verdicts --project=fraud-proj --member=serviceAccount:{sa("detect")} --role=roles/pubsub.publisher
gcloud pubsub topics get-iam-policy transactions-dead-letter --project=fraud-proj {POLICY}
gcloud pubsub topics add-iam-policy-binding transactions-dead-letter --project=fraud-proj --member=serviceAccount:{sa("detect")} --role=roles/pubsub.publisher
gcloud pubsub topics add-iam-policy-binding transactions-dead-letter --project=fraud-proj --member={AGENT} --role=roles/pubsub.publisher
gcloud pubsub topics get-iam-policy fraud-feedback-dead-letter --project=fraud-proj {POLICY}
gcloud pubsub topics add-iam-policy-binding fraud-feedback-dead-letter --project=fraud-proj --member=serviceAccount:{sa("feedback")} --role=roles/pubsub.publisher
gcloud pubsub topics add-iam-policy-binding fraud-feedback-dead-letter --project=fraud-proj --member={AGENT} --role=roles/pubsub.publisher
gcloud iam service-accounts get-iam-policy {sa("push")} --project=fraud-proj {POLICY}
gcloud iam service-accounts add-iam-policy-binding {sa("push")} --project=fraud-proj --member={AGENT} --role=roles/iam.serviceAccountTokenCreator
# functions
gcloud functions list --v2 --project=fraud-proj --regions=europe-west1 '--format=csv[no-heading](name.basename(),labels.config_digest)'
gcloud functions deploy detect-fraud {HEAD} --entry-point=detect_fraud --trigger-topic=transactions --retry --trigger-service-account={sa("push")} --run-service-account={sa("detect")} {SIZES} {ENV} {SECRET} --update-labels=config_digest=DIGEST --quiet
gcloud functions deploy record-feedback {HEAD} --entry-point=record_feedback --trigger-topic=fraud-feedback --retry --trigger-service-account={sa("push")} --run-service-account={sa("feedback")} {SIZES} {ENV},FEEDBACK_TOPIC=fraud-feedback,FEEDBACK_DEAD_LETTER_TOPIC=fraud-feedback-dead-letter {SECRET} --update-labels=config_digest=DIGEST --quiet
gcloud functions deploy score-transaction {HEAD} --entry-point=score_transaction --trigger-http --no-allow-unauthenticated --run-service-account={sa("score")} {SIZES} {ENV} {SECRET} --update-labels=config_digest=DIGEST --quiet
# dead-letter and retry policies of the triggers
gcloud functions describe detect-fraud --v2 --project=fraud-proj --region=europe-west1 '--format=value(eventTrigger.trigger)'
gcloud eventarc triggers describe DETECT_FRAUD_TRIGGER --project=fraud-proj --location=europe-west1 '--format=value(transport.pubsub.subscription)'
gcloud pubsub subscriptions describe DETECT_FRAUD_SUBSCRIPTION --project=fraud-proj {SUB_POLICY}
gcloud pubsub subscriptions update DETECT_FRAUD_SUBSCRIPTION --project=fraud-proj --dead-letter-topic=transactions-dead-letter --max-delivery-attempts=10 --min-retry-delay=10s --max-retry-delay=600s
gcloud pubsub subscriptions get-iam-policy DETECT_FRAUD_SUBSCRIPTION --project=fraud-proj {POLICY}
gcloud pubsub subscriptions add-iam-policy-binding DETECT_FRAUD_SUBSCRIPTION --project=fraud-proj --member={AGENT} --role=roles/pubsub.subscriber
gcloud run services get-iam-policy detect-fraud --project=fraud-proj --region=europe-west1 {POLICY}
gcloud functions add-invoker-policy-binding detect-fraud --project=fraud-proj --region=europe-west1 --member=serviceAccount:{sa("push")}
gcloud functions describe record-feedback --v2 --project=fraud-proj --region=europe-west1 '--format=value(eventTrigger.trigger)'
gcloud eventarc triggers describe RECORD_FEEDBACK_TRIGGER --project=fraud-proj --location=europe-west1 '--format=value(transport.pubsub.subscription)'
gcloud pubsub subscriptions describe RECORD_FEEDBACK_SUBSCRIPTION --project=fraud-proj {SUB_POLICY}
gcloud pubsub subscriptions update RECORD_FEEDBACK_SUBSCRIPTION --project=fraud-proj --dead-letter-topic=fraud-feedback-dead-letter --max-delivery-attempts=10 --min-retry-delay=10s --max-retry-delay=600s
gcloud pubsub subscriptions get-iam-policy RECORD_FEEDBACK_SUBSCRIPTION --project=fraud-proj {POLICY}
gcloud pubsub subscriptions add-iam-policy-binding RECORD_FEEDBACK_SUBSCRIPTION --project=fraud-proj --member={AGENT} --role=roles/pubsub.subscriber
gcloud run services get-iam-policy record-feedback --project=fraud-proj --region=europe-west1 {POLICY}
gcloud functions add-invoker-policy-binding record-feedback --project=fraud-proj --region=europe-west1 --member=serviceAccount:{sa("push")}
"""

EXPECTED_DELETE = f"""\
# functions
gcloud functions list --v2 --project=fraud-proj --regions=europe-west1 '--format=csv[no-heading](name.basename(),labels.config_digest)'
gcloud functions delete detect-fraud --project=fraud-proj --region=europe-west1 --quiet
gcloud functions delete record-feedback --project=fraud-proj --region=europe-west1 --quiet
gcloud functions delete score-transaction --project=fraud-proj --region=europe-west1 --quiet
# worker pool
gcloud beta run worker-pools list --project=fraud-proj --region=europe-west1 '--format=csv[no-heading](metadata.name,metadata.labels.config_digest)'
gcloud beta run worker-pools delete fraud-worker --project=fraud-proj --region=europe-west1 --quiet
# subscriptions
gcloud pubsub subscriptions list --project=fraud-proj {SUBS_LIST}
gcloud pubsub subscriptions delete transactions-dead-letter-keep fraud-feedback-dead-letter-keep fraud-worker fraud-worker-feedback --project=fraud-proj --quiet
# topics
gcloud pubsub topics list --project=fraud-proj {TOPICS_LIST}
gcloud pubsub topics delete transactions fraud-verdicts transactions-dead-letter fraud-feedback fraud-feedback-dead-letter --project=fraud-proj --quiet
# schema
gcloud pubsub schemas list --project=fraud-proj '--format=value(name.basename())'
gcloud pubsub schemas delete transaction-schema --project=fraud-proj --quiet
# service accounts
gcloud iam service-accounts list --project=fraud-proj '--format=value(email)'
gcloud iam service-accounts delete {sa("detect")} --project=fraud-proj --quiet
gcloud iam service-accounts delete {sa("feedback")} --project=fraud-proj --quiet
gcloud iam service-accounts delete {sa("score")} --project=fraud-proj --quiet
gcloud iam service-accounts delete {sa("push")} --project=fraud-proj --quiet
gcloud iam service-accounts delete {sa("worker")} --project=fraud-proj --quiet
# Redis URL secret
gcloud secrets list --project=fraud-proj '--format=csv[no-heading](name.basename(),labels.managed_by)'
gcloud secrets delete fraud-redis-url --project=fraud-proj --quiet
"""

EXPECTED_EMULATOR = f"""\
export CLOUDSDK_API_ENDPOINT_OVERRIDES_PUBSUB=http://127.0.0.1:8085/
export CLOUDSDK_AUTH_DISABLE_CREDENTIALS=true
# schema
gcloud pubsub schemas list --project=fraud-test '--format=value(name.basename())'
gcloud pubsub schemas create transaction-schema --project=fraud-test --type=avro --definition-file={{root}}/schemas/transaction.avsc
# topics
gcloud pubsub topics list --project=fraud-test {TOPICS_LIST}
gcloud pubsub topics create transactions --project=fraud-test --schema=transaction-schema --message-encoding=json
gcloud pubsub topics create fraud-verdicts transactions-dead-letter fraud-feedback fraud-feedback-dead-letter --project=fraud-test
# subscriptions
gcloud pubsub subscriptions list --project=fraud-test {SUBS_LIST}
gcloud pubsub subscriptions create transactions-dead-letter-keep --project=fraud-test --topic=transactions-dead-letter --expiration-period=never
gcloud pubsub subscriptions create fraud-feedback-dead-letter-keep --project=fraud-test --topic=fraud-feedback-dead-letter --expiration-period=never
gcloud pubsub subscriptions create fraud-verdicts-watch --project=fraud-test --topic=fraud-verdicts --expiration-period=never
gcloud pubsub subscriptions create detect-fraud-push --project=fraud-test --topic=transactions --push-endpoint=http://127.0.0.1:8080/projects/fraud-test/topics/transactions --dead-letter-topic=transactions-dead-letter --max-delivery-attempts=5 --min-retry-delay=1s --max-retry-delay=10s
gcloud pubsub subscriptions create record-feedback-push --project=fraud-test --topic=fraud-feedback --push-endpoint=http://127.0.0.1:8081/projects/fraud-test/topics/fraud-feedback --dead-letter-topic=fraud-feedback-dead-letter --max-delivery-attempts=5 --min-retry-delay=1s --max-retry-delay=10s
"""

EMULATOR_ARGS = (
    "--emulator", "127.0.0.1:8085", "--project", PROJECT, "--with-schema",
    "--push-endpoint", "http://127.0.0.1:8080", "--feedback-push-endpoint", "http://127.0.0.1:8081/",
)  # fmt: skip

OPTIONS_ARGS = (
    "--project", "fraud-proj", "--region", "us-central1", "--transactions-topic", "tx-in",
    "--results-topic", "tx-out", "--dead-letter-topic", "tx-dead", "--feedback-topic", "tx-labels",
    "--feedback-dead-letter-topic", "tx-labels-dead",
    "--service-account", "fraud-fn", "--memory", "1Gi", "--cpu", "2", "--concurrency", "40",
    "--max-instances", "3", "--min-instances", "1", "--timeout", "120s",
    "--max-delivery-attempts", "12", "--min-retry-delay", "20s", "--max-retry-delay", "300s",
    "--allow-unauthenticated",
    "--redis-secret", "team-redis:4", "--vpc-connector", "fraud-connector",
    "--model-path", "none", "--with-schema", "--schema-name", "tx-schema", "--record-all",
)  # fmt: skip


def test_dry_run_prints_the_deployment_commands(tmp_path: Path) -> None:
    """A default dry run prints exactly the expected gcloud commands, in order."""
    staging = tmp_path / "upload"
    output = dry_run(tmp_path, *DEPLOY_ARGS, "--staging-dir", str(staging))
    assert output == EXPECTED_DEPLOY.format(staging=staging)


def test_dry_run_with_options(tmp_path: Path) -> None:
    """Names, sizes, delivery, secret, access, schema and state options end up in the right
    commands."""
    staging = tmp_path / "upload"
    rules = tmp_path / "strict.yaml"
    rules.write_text("rules: []\n")
    output = dry_run(
        tmp_path, *OPTIONS_ARGS, "--rules-file", str(rules), "--staging-dir", str(staging)
    )
    sa = "fraud-fn-{}@fraud-proj.iam.gserviceaccount.com".format
    env = (
        "--set-env-vars=GOOGLE_CLOUD_PROJECT=fraud-proj,RESULTS_TOPIC=tx-out,"
        "DEAD_LETTER_TOPIC=tx-dead,MAX_DELIVERY_ATTEMPTS=12"
    )
    extra = (
        "RULES_FILE=config/strict.yaml,MODEL_PATH=none,STATE_RECORD=all "
        "--set-secrets=REDIS_URL=team-redis:4"
    )
    sizes = (
        "--memory=1Gi --cpu=2 --concurrency=40 --max-instances=3 --min-instances=1 --timeout=120s"
    )
    network = "--vpc-connector=fraud-connector --egress-settings=private-ranges-only"
    head = "--gen2 --project=fraud-proj --region=us-central1 --runtime=python311"
    policy = "--max-delivery-attempts=12 --min-retry-delay=20s --max-retry-delay=300s"
    expected = [
        "gcloud pubsub schemas create tx-schema --project=fraud-proj --type=avro "
        f"--definition-file={ROOT}/schemas/transaction.avsc",
        "gcloud pubsub topics create tx-in --project=fraud-proj --schema=tx-schema --message-encoding=json",
        "gcloud pubsub topics create tx-out tx-dead tx-labels tx-labels-dead --project=fraud-proj",
        "gcloud pubsub subscriptions create tx-dead-keep --project=fraud-proj --topic=tx-dead "
        "--expiration-period=never",
        "gcloud pubsub subscriptions create tx-labels-dead-keep --project=fraud-proj "
        "--topic=tx-labels-dead --expiration-period=never",
        # An existing secret is only checked, never written.
        "gcloud secrets versions describe 4 --secret=team-redis --project=fraud-proj "
        "'--format=csv[no-heading](name.basename(),state)'",
        f"gcloud functions deploy detect-fraud {head} --source={staging} --entry-point=detect_fraud "
        f"--trigger-topic=tx-in --retry --trigger-service-account={sa('push')} "
        f"--run-service-account={sa('detect')} {sizes} {env},{extra} {network} "
        "--update-labels=config_digest=DIGEST --quiet",
        f"gcloud functions deploy record-feedback {head} --source={staging} "
        f"--entry-point=record_feedback --trigger-topic=tx-labels --retry "
        f"--trigger-service-account={sa('push')} --run-service-account={sa('feedback')} {sizes} "
        f"{env},FEEDBACK_TOPIC=tx-labels,FEEDBACK_DEAD_LETTER_TOPIC=tx-labels-dead,{extra} "
        f"{network} --update-labels=config_digest=DIGEST --quiet",
        f"gcloud functions deploy score-transaction {head} --source={staging} "
        f"--entry-point=score_transaction --trigger-http --allow-unauthenticated "
        f"--run-service-account={sa('score')} {sizes} {env},{extra} {network} "
        "--update-labels=config_digest=DIGEST --quiet",
        "gcloud pubsub subscriptions update DETECT_FRAUD_SUBSCRIPTION --project=fraud-proj "
        f"--dead-letter-topic=tx-dead {policy}",
        "gcloud pubsub subscriptions update RECORD_FEEDBACK_SUBSCRIPTION --project=fraud-proj "
        f"--dead-letter-topic=tx-labels-dead {policy}",
    ]
    lines = output.splitlines()
    for line in expected:
        assert line in lines
    assert not [line for line in lines if line.startswith("gcloud secrets create")]
    assert not [line for line in lines if "versions add" in line]
    assert (staging / "config" / "strict.yaml").read_text() == "rules: []\n"


def test_dry_run_delete(tmp_path: Path) -> None:
    """--delete --dry-run prints the removal of everything a deployment creates."""
    output = dry_run(tmp_path, "--delete", "--project", "fraud-proj", "--region", "europe-west1")
    assert output == EXPECTED_DELETE


def test_dry_run_emulator(tmp_path: Path) -> None:
    """An emulator dry run prints the environment and the topic and subscription commands."""
    assert dry_run(tmp_path, *EMULATOR_ARGS) == EXPECTED_EMULATOR.format(root=ROOT)


def test_dry_run_needs_no_gcloud(tmp_path: Path) -> None:
    """A dry run succeeds with no gcloud on PATH, so it cannot have run any gcloud command."""
    result = run_deploy(
        "--dry-run", *DEPLOY_ARGS, "--staging-dir", str(tmp_path / "upload"),
        config=tmp_path / "gcloud", path=tools_path(tmp_path),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    output = re.sub(r"config_digest=[0-9a-f]{32}", "config_digest=DIGEST", result.stdout)
    assert output == EXPECTED_DEPLOY.format(staging=tmp_path / "upload")


@pytest.fixture()
def clone(tmp_path: Path) -> Path:
    """A copy of what deploy.sh packages, so edits to the working tree cannot move digests."""
    copy = tmp_path / "clone"
    copy.mkdir()
    shutil.copy2(DEPLOY, copy / "deploy.sh")
    shutil.copy2(ROOT / "requirements.txt", copy / "requirements.txt")
    shutil.copytree(
        ROOT / "detector", copy / "detector", ignore=shutil.ignore_patterns("__pycache__")
    )
    return copy


def config_digests(clone: Path, *args: str, staging: str = "upload") -> list[str]:
    result = run_deploy(
        "--dry-run", *DEPLOY_ARGS, "--staging-dir", str(clone.parent / staging), *args,
        config=clone.parent / "gcloud",
        script=clone / "deploy.sh",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return re.findall(r"config_digest=([0-9a-f]{32})", result.stdout)


def test_config_digest_follows_source_and_settings(clone: Path, tmp_path: Path) -> None:
    """The redeploy label is stable (wherever the upload is staged), and follows settings and source."""
    rules = tmp_path / "rules.yaml"
    rules.write_text("rules: []\n")
    first = config_digests(clone, "--rules-file", str(rules))
    assert len(first) == 3
    assert len(set(first)) == 3
    assert config_digests(clone, "--rules-file", str(rules)) == first
    assert config_digests(clone, "--rules-file", str(rules), staging="elsewhere") == first
    more_memory = config_digests(clone, "--rules-file", str(rules), "--memory", "1Gi")
    assert all(a != b for a, b in zip(first, more_memory, strict=True))
    rules.write_text("rules: [] # edited\n")
    edited = config_digests(clone, "--rules-file", str(rules))
    assert all(a != b for a, b in zip(first, edited, strict=True))
    rules.write_text("rules: []\n")
    with (clone / "detector" / "main.py").open("a") as main:
        main.write("\n# edited\n")
    assert config_digests(clone, "--rules-file", str(rules)) != first


def flag_check_env(config: Path) -> dict[str, str]:
    """Environment for running printed commands: no account, no credentials, no network."""
    config.mkdir(parents=True, exist_ok=True)
    return {
        "PATH": os.environ["PATH"],
        "HOME": str(config),
        "CLOUDSDK_CONFIG": str(config),
        "CLOUDSDK_CORE_DISABLE_PROMPTS": "1",
        # Never use a machine's own (GCE metadata) credentials, never reach the network.
        "CLOUDSDK_CORE_CHECK_GCE_METADATA": "false",
        "CLOUDSDK_PROXY_TYPE": "http",
        "CLOUDSDK_PROXY_ADDRESS": "127.0.0.1",
        "CLOUDSDK_PROXY_PORT": "9",
    }


# Runs under gcloud's own Python: builds the gcloud CLI once, then forks one child per command
# line, which runs exactly what `gcloud ARGS...` runs. About 0.15 s of CPU per command instead
# of a full gcloud start-up (about 1 s), which matters for ~80 commands on a shared machine.
FORKING_RUNNER = """
import json, os, sys

lib, out_dir, parallel = sys.argv[1], sys.argv[2], int(sys.argv[3])
commands = json.load(sys.stdin)
sys.path.insert(0, lib)
import gcloud as launcher

sys.path = launcher.reorder_sys_path(sys.path)
launcher._fix_google_module()
gcloud_main = launcher._import_gcloud_main()
cli = gcloud_main.CreateCLI([])


def child(index, argv):
    err = os.open(os.path.join(out_dir, f"{index}.err"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.dup2(err, 2)
    sys.argv = ["gcloud", *argv]
    code = 0
    try:
        gcloud_main.main(gcloud_cli=cli)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        code = 99
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


codes, running, pending = {}, {}, list(enumerate(commands))
while pending or running:
    while pending and len(running) < parallel:
        index, argv = pending.pop(0)
        pid = os.fork()
        if pid == 0:
            child(index, argv)
        running[pid] = index
    pid, status = os.wait()
    codes[running.pop(pid)] = os.waitstatus_to_exitcode(status)
json.dump([codes[i] for i in range(len(commands))], sys.stdout)
"""


def run_gcloud_commands(commands: list[str], workdir: Path) -> list[tuple[int, str]]:
    """Exit code and stderr of each gcloud command line, run with no account."""
    env = flag_check_env(workdir / "config")
    argvs = [shlex.split(command)[1:] for command in commands]
    info = subprocess.run(
        ["gcloud", "info", "--format=value(basic.python_location,installation.sdk_root)"],
        env=env, capture_output=True, text=True, timeout=120, check=True,
    ).stdout.split()  # fmt: skip
    lib = Path(info[1]) / "lib" if len(info) == 2 else Path("/nonexistent")
    if (lib / "gcloud.py").is_file():
        out = workdir / "stderr"
        out.mkdir()
        (workdir / "runner.py").write_text(FORKING_RUNNER)
        result = subprocess.run(
            [info[0], str(workdir / "runner.py"), str(lib), str(out), str(os.cpu_count() or 2)],
            input=json.dumps(argvs), env=env, capture_output=True, text=True, timeout=900,
            check=False,
        )  # fmt: skip
        if result.returncode == 0:
            codes = json.loads(result.stdout)
            return [(code, (out / f"{i}.err").read_text()) for i, code in enumerate(codes)]
    # An SDK laid out differently: one gcloud process per command.

    def run_one(argv: list[str]) -> tuple[int, str]:
        done = subprocess.run(
            ["gcloud", *argv], env=env, capture_output=True, text=True, timeout=120, check=False
        )
        return done.returncode, done.stderr

    with ThreadPoolExecutor(max_workers=4) as pool:
        return list(pool.map(run_one, argvs))


def test_flag_check_every_generated_command(tmp_path: Path) -> None:
    """gcloud parses the flags of every command a dry run prints (exit 1 for no account, never 2)."""
    outputs = [
        dry_run(tmp_path, *DEPLOY_ARGS, "--staging-dir", str(tmp_path / "a"), mask=False),
        dry_run(tmp_path, *OPTIONS_ARGS, "--staging-dir", str(tmp_path / "b"), mask=False),
        dry_run(tmp_path, *DEPLOY_ARGS, "--worker", "--network", "vpc-1", "--subnet", "sub-1",
                "--staging-dir", str(tmp_path / "c"), mask=False),
        dry_run(tmp_path, "--delete", "--project", "fraud-proj", "--region", "europe-west1"),
        dry_run(tmp_path, *EMULATOR_ARGS),
        dry_run(tmp_path, *EMULATOR_ARGS, "--worker"),
        dry_run(tmp_path, "--delete", "--emulator", "127.0.0.1:8085", "--project", PROJECT),
    ]  # fmt: skip
    for index, (engine, cluster) in enumerate(REDIS_KINDS):
        outputs.append(dry_run(
            tmp_path, "--project", "fraud-proj", "--region", "europe-west1",
            "--create-redis", "fraud-state", "--redis-engine", engine, *cluster,
            *(["--worker", "--worker-image", "europe-docker.pkg.dev/p/r/worker:1"] if index else []),
            "--staging-dir", str(tmp_path / f"redis-{index}"), mask=False,
        ))  # fmt: skip
    commands = sorted({line for output in outputs for line in gcloud_lines(output)})
    assert len(commands) > 130
    # The check itself must be able to fail: a misspelt flag has to come back as exit 2.
    typo = commands[0] + " --projcet=fraud-proj"
    results = run_gcloud_commands([*commands, typo], tmp_path)
    assert results[-1][0] == 2, results[-1][1]
    failures = [
        f"{command}\n  exit {code}: {stderr.strip()[:500]}"
        for command, (code, stderr) in zip(commands, results, strict=False)
        if code != 1 or NO_ACCOUNT not in stderr
    ]
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--region", "europe-west1"], "--project: is required"),
        (["--project", "fraud-proj"], "--region: is required"),
        (["--bogus"], "unknown option: --bogus"),
        (["--project", "fraud-proj", "--region", "europe-west1", "--max-delivery-attempts", "3"],
         "--max-delivery-attempts: must be between 5 and 100, got 3"),
        (["--project", "fraud-proj", "--region", "europe-west1", "--transactions-topic", "tx"],
         "--transactions-topic: must be 3-255 letters"),
        (["--project", "fraud-proj", "--region", "europe-west1", "--push-endpoint", "http://x"],
         "--push-endpoint: only with --emulator"),
        (["--emulator", "localhost", "--project", "fraud-proj"],
         "--emulator: must be HOST:PORT, got 'localhost'"),
        (["--project", "fraud-proj", "--region", "europe-west1", "--dry-run=yes"],
         "--dry-run: takes no value"),
        ([*DEPLOY_ARGS, "--create-redis", "fraud-state"],
         "--redis-url, --redis-secret, --create-redis: give only one"),
        ([*DEPLOY_ARGS, "--redis-engine", "memcached"],
         "--redis-engine: must be valkey or redis, got 'memcached'"),
        ([*DEPLOY_ARGS, "--worker", "--vpc-connector", "c1"],
         "--vpc-connector: a worker pool has no connector"),
        ([*DEPLOY_ARGS, "--network", "vpc-1", "--vpc-connector", "c1"],
         "--vpc-connector: choose it or --network/--subnet"),
        ([*DEPLOY_ARGS, "--max-retry-delay", "700s"],
         "--max-retry-delay: must be between 10s and 600s, got 700s"),
        ([*DEPLOY_ARGS, "--min-retry-delay", "1m"],
         "--min-retry-delay: must be whole seconds like 10s, got '1m'"),
        ([*DEPLOY_ARGS, "--feedback-dead-letter-topic", "transactions-dead-letter"],
         "--feedback-dead-letter-topic: must differ from --dead-letter-topic"),
        ([*DEPLOY_ARGS, "--redis-secret-name", "bad name"],
         "--redis-secret-name: must be 1-255 letters"),
        (["--project", "fraud-proj", "--region", "europe-west1", "--redis-secret", "s:first"],
         "--redis-secret: must be NAME or NAME:VERSION"),
        (["--project", "fraud-proj", "--region", "europe-west1", "--redis-url",
          f"redis://:{PASSWORD}@host with space"], "--redis-url: must be a redis:// or rediss:// URL"),
    ],
)  # fmt: skip
def test_bad_arguments_are_named(tmp_path: Path, args: list[str], message: str) -> None:
    """A bad or missing option stops before any step, naming the option and the problem."""
    result = run_deploy(*args, config=tmp_path / "gcloud")
    assert result.returncode == 2
    assert message in result.stderr
    assert result.stdout == ""
    assert PASSWORD not in result.stderr


def test_no_gcloud_is_an_error(tmp_path: Path) -> None:
    """Without gcloud on PATH a real run names the missing tool and exits non-zero."""
    result = run_deploy(*DEPLOY_ARGS, config=tmp_path / "gcloud", path=tools_path(tmp_path))
    assert result.returncode == 1
    assert 'step "find gcloud" failed: gcloud is not on PATH' in result.stderr
    assert "no step had finished" in result.stderr


def test_failing_gcloud_step_is_named(tmp_path: Path) -> None:
    """With no account the first gcloud step fails: it is named, with gcloud's reason."""
    result = run_deploy(
        *DEPLOY_ARGS, "--staging-dir", str(tmp_path / "upload"), config=tmp_path / "gcloud",
        offline=True,
    )  # fmt: skip
    assert result.returncode == 1
    assert 'step "list enabled APIs" failed' in result.stderr
    assert NO_ACCOUNT in result.stderr
    assert "no step had finished" in result.stderr
    assert PASSWORD not in result.stdout + result.stderr


def test_shellcheck() -> None:
    """deploy.sh is shellcheck-clean."""
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (Debian package shellcheck); CI installs it")
    result = subprocess.run([shellcheck, str(DEPLOY)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout


# ---------------------------------------------------------------------------- shared state

REDIS_KINDS = [("valkey", []), ("valkey", ["--redis-cluster"]), ("redis", []),
               ("redis", ["--redis-cluster"])]  # fmt: skip


@pytest.mark.parametrize("dry", [True, False])
@pytest.mark.parametrize("extra", [[], ["--worker"]])
def test_deployment_without_shared_state_is_refused(
    tmp_path: Path, dry: bool, extra: list[str]
) -> None:
    """Without Redis a deployment stops at once with one line saying why and what to pass."""
    args = ["--project", "fraud-proj", "--region", "europe-west1", *extra]
    result = run_deploy(*(["--dry-run"] if dry else []), *args, config=tmp_path / "gcloud")
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert "own memory" in lines[0]
    assert "--redis-url" in lines[0] and "--create-redis" in lines[0]


def test_emulator_and_package_need_no_shared_state(tmp_path: Path) -> None:
    """Local provisioning and packaging do not deploy instances, so they need no Redis."""
    assert "gcloud pubsub topics create" in dry_run(tmp_path, *EMULATOR_ARGS)
    result = run_deploy("--package", str(tmp_path / "upload"), config=tmp_path / "gcloud")
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("extra", [[], ["--worker"], ["--network", "vpc-1"]])
def test_redis_url_is_never_printed(tmp_path: Path, extra: list[str]) -> None:
    """A dry run shows the secret's name, never the URL or its password."""
    result = run_deploy(
        "--dry-run", *DEPLOY_ARGS, *extra, "--staging-dir", str(tmp_path / "upload"),
        config=tmp_path / "gcloud",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert PASSWORD not in result.stdout + result.stderr
    assert "10.0.0.3" not in result.stdout
    deploys = [line for line in gcloud_lines(result.stdout) if " deploy " in line]
    assert deploys
    for line in deploys:
        assert "--set-secrets=REDIS_URL=fraud-redis-url:latest" in line
        assert "REDIS_URL" not in line.split("--set-env-vars=")[1].split()[0]


# A stand-in for gcloud: logs each command line and whatever it gets on stdin, answers the
# reads deploy.sh needs, and fails where told to (echoing its input, as a careless tool might).
FAKE_GCLOUD = r"""#!/usr/bin/env bash
printf '%s\n' "$*" >>"$FAKE_DIR/argv"
input=""
if [[ " $* " == *" --data-file=- "* ]]; then
  input=$(cat)
  printf '%s\n' "$input" >>"$FAKE_DIR/stdin"
fi
for word in "$@"; do
  if [[ -f $FAKE_DIR/fail-$word ]]; then
    echo "ERROR: rejected: $input" >&2
    exit 1
  fi
done
case "$1 $2 $3" in
  "projects describe "*) echo 123 ;;
  "functions list "*) cat "$FAKE_DIR/functions" 2>/dev/null ;;
  "secrets list "*) cat "$FAKE_DIR/secrets" 2>/dev/null ;;
  "secrets versions access") cat "$FAKE_DIR/secret-value" 2>/dev/null ;;
  "secrets versions describe") echo "1,ENABLED" ;;
  "functions describe "*) echo "projects/p/locations/r/triggers/t" ;;
  "eventarc triggers describe") echo "projects/p/subscriptions/s" ;;
esac
exit 0
"""


@pytest.fixture()
def fake_gcloud(tmp_path: Path) -> Path:
    """A directory whose gcloud is FAKE_GCLOUD; its logs and answers live in the same place."""
    fake = tmp_path / "fake"
    fake.mkdir()
    script = fake / "gcloud"
    script.write_text(FAKE_GCLOUD)
    script.chmod(0o755)
    return fake


def run_with_fake(fake: Path, *args: str) -> subprocess.CompletedProcess[str]:
    config = fake.parent / "gcloud-config"
    config.mkdir(exist_ok=True)
    env = {
        "PATH": f"{fake}:{os.environ['PATH']}", "HOME": str(config), "CLOUDSDK_CONFIG": str(config),
        "FAKE_DIR": str(fake), "LC_ALL": "C.UTF-8",
    }  # fmt: skip
    return subprocess.run(
        [str(DEPLOY), *args, "--staging-dir", str(fake.parent / "upload")],
        env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip


def test_redis_url_goes_on_stdin_and_failures_are_redacted(fake_gcloud: Path) -> None:
    """The URL reaches gcloud on stdin only; a failing step echoing it is reported redacted."""
    (fake_gcloud / "fail-fraud-redis-url").touch()  # commands naming the secret fail
    result = run_with_fake(fake_gcloud, *DEPLOY_ARGS)
    assert result.returncode == 1
    assert 'step "create secret fraud-redis-url holding the Redis URL" failed' in result.stderr
    assert "ERROR: rejected: <secret>" in result.stderr
    assert "running: gcloud" in result.stderr
    assert PASSWORD not in result.stdout + result.stderr
    assert PASSWORD not in (fake_gcloud / "argv").read_text()
    assert (fake_gcloud / "stdin").read_text() == REDIS_URL + "\n"


def test_redis_url_secret_is_written_once(fake_gcloud: Path) -> None:
    """A rerun with the same URL leaves the secret alone; another URL adds a version."""
    (fake_gcloud / "secrets").write_text("fraud-redis-url\n")
    (fake_gcloud / "secret-value").write_text(REDIS_URL)
    same = run_with_fake(fake_gcloud, *DEPLOY_ARGS)
    assert same.returncode == 0, same.stderr
    assert "skipped: secret fraud-redis-url holds this Redis URL" in same.stderr
    argv = (fake_gcloud / "argv").read_text()
    assert "secrets versions add" not in argv and "secrets create" not in argv
    assert PASSWORD not in same.stdout + same.stderr

    (fake_gcloud / "argv").unlink()
    moved = REDIS_URL.replace("10.0.0.3", "10.0.0.9")
    changed = run_with_fake(fake_gcloud, *DEPLOY_ARGS[:-1], moved)
    assert changed.returncode == 0, changed.stderr
    assert "did: add a version to secret fraud-redis-url" in changed.stderr
    assert "secrets versions add fraud-redis-url" in (fake_gcloud / "argv").read_text()
    assert (fake_gcloud / "stdin").read_text() == moved + "\n"
    assert PASSWORD not in changed.stdout + changed.stderr


def test_worker_refuses_to_run_beside_the_push_functions(fake_gcloud: Path) -> None:
    """--worker stops before deploying when detect-fraud would decide every transaction too."""
    (fake_gcloud / "functions").write_text("detect-fraud,0123\n")
    result = run_with_fake(fake_gcloud, *DEPLOY_ARGS, "--worker")
    assert result.returncode == 1
    assert "functions detect-fraud are deployed" in result.stderr
    assert "worker-pools deploy" not in (fake_gcloud / "argv").read_text()


@pytest.mark.parametrize(("engine", "cluster"), REDIS_KINDS)
def test_create_redis(tmp_path: Path, engine: str, cluster: list[str]) -> None:
    """--create-redis makes an instance with AUTH and TLS, reachable over Direct VPC egress."""
    output = dry_run(
        tmp_path, "--project", "fraud-proj", "--region", "europe-west1", "--create-redis",
        "fraud-state", "--redis-engine", engine, *cluster, "--staging-dir", str(tmp_path / "up"),
    )  # fmt: skip
    lines = gcloud_lines(output)
    creates = [line for line in lines if re.match(r"gcloud (memorystore|redis) \S+ create ", line)]
    assert len(creates) == 1
    create = creates[0]
    assert "--transit-encryption-mode=server-authentication" in create
    listed = [line for line in lines if re.match(r"gcloud (memorystore|redis) \S+ list ", line)]
    assert lines.index(listed[0]) < lines.index(create)  # looked for before it is created
    if engine == "valkey":
        assert create.startswith("gcloud memorystore instances create fraud-state ")
        assert f"--mode={'cluster' if cluster else 'cluster-disabled'}" in create
        assert "--authorization-mode=iam-auth" in create
    elif cluster:
        assert create.startswith("gcloud redis clusters create fraud-state ")
        assert "--auth-mode=iam-auth" in create
    else:
        assert create.startswith("gcloud redis instances create fraud-state ")
        assert "--enable-auth" in create
        assert any(" get-auth-string fraud-state " in line for line in lines)
    iam_auth = engine == "valkey" or bool(cluster)
    assert any("certificate-authority" in line or "serverCaCerts" in line for line in lines)
    policies = [line for line in lines if "service-connection-policies create" in line]
    assert len(policies) == (1 if iam_auth else 0)
    grants = [line for line in lines if line.startswith("gcloud projects add-iam-policy-binding")]
    assert len(grants) == (3 if iam_auth else 0)  # the three functions' accounts
    assert (
        "gcloud secrets create fraud-redis-url --project=fraud-proj "
        "--replication-policy=automatic --labels=managed_by=deploy_sh --data-file=-"
    ) in lines
    deploys = [line for line in lines if line.startswith("gcloud functions deploy")]
    for line in deploys:
        assert "--set-secrets=REDIS_URL=fraud-redis-url:latest" in line
        assert ("REDIS_IAM_AUTH=true" in line) == iam_auth
    updates = [line for line in lines if line.startswith("gcloud run services update")]
    assert len(updates) == 3
    assert all(
        "--network=default --subnet=default --vpc-egress=private-ranges-only" in u for u in updates
    )


def bindings(output: str) -> set[tuple[str, str, str]]:
    """(resource, role, member) of every grant a dry run prints."""
    found = set()
    for line in gcloud_lines(output):
        words = shlex.split(line)
        verbs = [i for i, w in enumerate(words) if w.endswith("-policy-binding")]
        if verbs and words[verbs[0]].startswith("add-"):
            verb = verbs[0]
            flags = dict(w[2:].split("=", 1) for w in words if w.startswith("--") and "=" in w)
            resource = f"{words[verb - 1]}/{words[verb + 1]}"
            found.add((resource, flags.get("role", "roles/run.invoker"), flags["member"]))
    return found


PUBLISH, SUBSCRIBE, READ = "roles/pubsub.publisher", "roles/pubsub.subscriber", "roles/secretmanager.secretAccessor"  # fmt: skip


def test_each_account_may_do_only_its_job(tmp_path: Path) -> None:
    """Per-function accounts: grants are on topics, subscriptions, the secret, never the project."""
    member = "serviceAccount:fraud-detector-{}@fraud-proj.iam.gserviceaccount.com".format
    functions = bindings(dry_run(tmp_path, *DEPLOY_ARGS, "--staging-dir", str(tmp_path / "a")))
    assert functions == {
        ("topics/fraud-verdicts", PUBLISH, member("detect")),
        ("topics/transactions-dead-letter", PUBLISH, member("detect")),
        ("topics/transactions-dead-letter", PUBLISH, AGENT),
        ("topics/fraud-feedback-dead-letter", PUBLISH, member("feedback")),
        ("topics/fraud-feedback-dead-letter", PUBLISH, AGENT),
        ("secrets/fraud-redis-url", READ, member("detect")),
        ("secrets/fraud-redis-url", READ, member("feedback")),
        ("secrets/fraud-redis-url", READ, member("score")),
        ("subscriptions/DETECT_FRAUD_SUBSCRIPTION", SUBSCRIBE, AGENT),
        ("subscriptions/RECORD_FEEDBACK_SUBSCRIPTION", SUBSCRIBE, AGENT),
        ("functions/detect-fraud", "roles/run.invoker", member("push")),
        ("functions/record-feedback", "roles/run.invoker", member("push")),
        ("service-accounts/" + member("push").split(":")[1], "roles/iam.serviceAccountTokenCreator", AGENT),
    }  # fmt: skip
    worker = bindings(
        dry_run(tmp_path, *DEPLOY_ARGS, "--worker", "--staging-dir", str(tmp_path / "b"))
    )
    assert worker == {
        ("topics/fraud-verdicts", PUBLISH, member("worker")),
        ("topics/transactions-dead-letter", PUBLISH, member("worker")),
        ("topics/transactions-dead-letter", PUBLISH, AGENT),
        ("topics/fraud-feedback-dead-letter", PUBLISH, member("worker")),
        ("topics/fraud-feedback-dead-letter", PUBLISH, AGENT),
        ("secrets/fraud-redis-url", READ, member("worker")),
        ("secrets/fraud-redis-url", READ, member("score")),
        ("subscriptions/fraud-worker", SUBSCRIBE, member("worker")),
        ("subscriptions/fraud-worker", SUBSCRIBE, AGENT),
        ("subscriptions/fraud-worker-feedback", SUBSCRIBE, member("worker")),
        ("subscriptions/fraud-worker-feedback", SUBSCRIBE, AGENT),
    }  # fmt: skip


def waits(attempts: int, first: int, cap: int) -> list[int]:
    """Pub/Sub's waits between deliveries: exponential from the minimum, capped at the maximum."""
    return [min(cap, first * 2**n) for n in range(attempts - 1)]


@pytest.mark.parametrize("extra", [[], ["--worker"]])
def test_deployed_retry_policy_rides_out_a_15_minute_outage(
    tmp_path: Path, extra: list[str]
) -> None:
    """Every subscription feeding the detector waits well over 15 minutes before dead-lettering."""
    output = dry_run(tmp_path, *DEPLOY_ARGS, *extra, "--staging-dir", str(tmp_path / "up"))
    policies = re.findall(
        r"--dead-letter-topic=(\S+) --max-delivery-attempts=(\d+) --min-retry-delay=(\d+)s "
        r"--max-retry-delay=(\d+)s", output,
    )  # fmt: skip
    assert {topic for topic, *_ in policies} == {
        "transactions-dead-letter",
        "fraud-feedback-dead-letter",
    }
    for _, attempts, first, cap in policies:
        assert int(cap) <= 600 and 5 <= int(attempts) <= 100
        assert sum(waits(int(attempts), int(first), int(cap))) >= 1.5 * 900
        assert f"MAX_DELIVERY_ATTEMPTS={attempts}" in output
    # The arithmetic in the docs is the deployed one.
    docs = (ROOT / "docs" / "deploy.md").read_text()
    total = sum(waits(10, 10, 600))
    assert f"= {total:,} s" in docs


def test_worker_dry_run(tmp_path: Path) -> None:
    """--worker: pull subscriptions with the delivery policy, a worker pool, no push functions."""
    staging = tmp_path / "upload"
    output = dry_run(
        tmp_path, *DEPLOY_ARGS, "--worker", "--network", "vpc-1", "--staging-dir", str(staging)
    )
    lines = gcloud_lines(output)
    policy = "--max-delivery-attempts=10 --min-retry-delay=10s --max-retry-delay=600s"
    assert (
        "gcloud pubsub subscriptions create fraud-worker --project=fraud-proj --topic=transactions "
        f"--ack-deadline=60 --expiration-period=never --dead-letter-topic=transactions-dead-letter {policy}"
    ) in lines
    assert (
        "gcloud pubsub subscriptions create fraud-worker-feedback --project=fraud-proj "
        "--topic=fraud-feedback --ack-deadline=60 --expiration-period=never "
        f"--dead-letter-topic=fraud-feedback-dead-letter {policy}"
    ) in lines
    worker_sa = "fraud-detector-worker@fraud-proj.iam.gserviceaccount.com"
    assert (
        "gcloud beta run worker-pools deploy fraud-worker --project=fraud-proj --region=europe-west1 "
        f"--source={tmp_path / 'worker-source'} --service-account={worker_sa} --cpu=1 --memory=512Mi "
        "--scaling=1 --args=--subscription,fraud-worker,--feedback-subscription,fraud-worker-feedback "
        "--set-env-vars=GOOGLE_CLOUD_PROJECT=fraud-proj,RESULTS_TOPIC=fraud-verdicts,"
        "DEAD_LETTER_TOPIC=transactions-dead-letter,MAX_DELIVERY_ATTEMPTS=10,"
        "FEEDBACK_DEAD_LETTER_TOPIC=fraud-feedback-dead-letter "
        "--set-secrets=REDIS_URL=fraud-redis-url:latest --network=vpc-1 --subnet=vpc-1 "
        "--vpc-egress=private-ranges-only --update-labels=config_digest=DIGEST --quiet"
    ) in lines
    deployed = [line.split()[3] for line in lines if line.startswith("gcloud functions deploy")]
    assert deployed == ["score-transaction"]
    assert not [line for line in lines if "detect-fraud" in line or "record-feedback" in line]
    # The build context: the Dockerfile and what it copies, nothing the worker does not run.
    context = tmp_path / "worker-source"
    files = {p.relative_to(context).as_posix() for p in context.rglob("*") if p.is_file()}
    assert {"Dockerfile", ".dockerignore", "requirements.txt", "detector/__init__.py"} <= files
    assert not [
        f for f in files if f.startswith(("detector/offline/", "config/")) or f == "main.py"
    ]


def test_worker_refuses_files_the_image_cannot_carry(tmp_path: Path) -> None:
    """A ruleset file is uploaded with the functions, not baked into the worker image."""
    rules = tmp_path / "rules.yaml"
    rules.write_text("rules: []\n")
    result = run_deploy(
        "--dry-run", *DEPLOY_ARGS, "--worker", "--rules-file", str(rules),
        config=tmp_path / "gcloud",
    )  # fmt: skip
    assert result.returncode == 2
    assert "--rules-file, --model-path FILE: not with --worker" in result.stderr


def test_dockerfile_runs_the_worker_unprivileged() -> None:
    """The image: python:3.11-slim, requirements installed, non-root, `detector worker` entry."""
    lines = [
        line.strip()
        for line in (ROOT / "Dockerfile").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "FROM python:3.11-slim"
    assert "RUN pip install -r requirements.txt" in lines
    assert lines.index("COPY requirements.txt .") < lines.index("COPY detector/ detector/")
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    entry = next(line for line in lines if line.startswith("ENTRYPOINT"))
    cmd = next(line for line in lines if line.startswith("CMD"))
    assert json.loads(entry.split(None, 1)[1]) == ["python", "-m", "detector", "worker"]
    assert json.loads(cmd.split(None, 1)[1])[:2] == ["--subscription", "fraud-worker"]
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    assert {"*", "!requirements.txt", "!detector/", "detector/offline/", "**/tests/"} <= set(
        ignored
    )


# ---------------------------------------------------------------------------- emulator


@pytest.fixture()
def names() -> dict[str, str]:
    return {
        "transactions": services.unique("tx"),
        "results": services.unique("verdicts"),
        "dead_letter": services.unique("dead"),
        "feedback": services.unique("feedback"),
        "feedback_dead_letter": services.unique("feedback-dead"),
        "push": services.unique("detect-push"),
        "feedback_push": services.unique("feedback-push"),
        "schema": services.unique("schema"),
    }


def emulator_args(emulator: str, names: dict[str, str]) -> list[str]:
    return [
        "--emulator", emulator, "--project", PROJECT,
        "--transactions-topic", names["transactions"], "--results-topic", names["results"],
        "--dead-letter-topic", names["dead_letter"], "--feedback-topic", names["feedback"],
        "--feedback-dead-letter-topic", names["feedback_dead_letter"],
        "--push-subscription", names["push"], "--feedback-push-subscription", names["feedback_push"],
        "--push-endpoint", "http://127.0.0.1:9/", "--feedback-push-endpoint", "http://127.0.0.1:10",
        "--with-schema", "--schema-name", names["schema"],
    ]  # fmt: skip


@pytest.mark.integration
def test_emulator_provisioning_lifecycle(
    emulator: str, pubsub_env: dict[str, str], names: dict[str, str], tmp_path: Path
) -> None:
    """--emulator creates everything; a rerun skips all; drift is updated; --delete removes all."""
    from google.api_core.exceptions import NotFound
    from google.cloud import pubsub_v1
    from google.pubsub_v1.types import Encoding

    publisher = pubsub_v1.PublisherClient()
    subscriber = pubsub_v1.SubscriberClient()
    # A transactions topic that already exists without a schema gets the schema attached.
    publisher.create_topic(name=publisher.topic_path(PROJECT, names["transactions"]))

    args = emulator_args(emulator, names)
    first = run_deploy(*args, config=tmp_path / "gcloud")
    assert first.returncode == 0, first.stderr
    assert f"did: attach schema {names['schema']} to topic {names['transactions']}" in first.stderr
    assert "summary: did 8, skipped 0" in first.stderr

    def topic(name: str) -> str:
        return publisher.topic_path(PROJECT, name)

    def subscription(name: str) -> pubsub_v1.types.Subscription:
        return subscriber.get_subscription(subscription=subscriber.subscription_path(PROJECT, name))

    transactions = publisher.get_topic(topic=topic(names["transactions"]))
    assert transactions.schema_settings.schema == f"projects/{PROJECT}/schemas/{names['schema']}"
    assert transactions.schema_settings.encoding == Encoding.JSON
    for key in ("results", "dead_letter", "feedback", "feedback_dead_letter"):
        assert not publisher.get_topic(topic=topic(names[key])).schema_settings.schema

    for key, endpoint, source, dead_letter in [
        ("push", "http://127.0.0.1:9", "transactions", "dead_letter"),
        ("feedback_push", "http://127.0.0.1:10", "feedback", "feedback_dead_letter"),
    ]:
        push = subscription(names[key])
        assert push.topic == topic(names[source])
        assert push.push_config.push_endpoint == (
            f"{endpoint}/projects/{PROJECT}/topics/{names[source]}"
        )
        assert push.dead_letter_policy.dead_letter_topic == topic(names[dead_letter])
        assert push.dead_letter_policy.max_delivery_attempts == 5
        assert push.retry_policy.minimum_backoff == timedelta(seconds=1)
        assert push.retry_policy.maximum_backoff == timedelta(seconds=10)

    for name, source in [
        (f"{names['dead_letter']}-keep", "dead_letter"),
        (f"{names['feedback_dead_letter']}-keep", "feedback_dead_letter"),
        (f"{names['results']}-watch", "results"),
    ]:
        pull = subscription(name)
        assert pull.topic == topic(names[source])
        assert not pull.push_config.push_endpoint
        assert "expiration_policy" in pull  # set, with no ttl: never expires
        assert not pull.expiration_policy.ttl

    # Dead letters are kept: what reaches the dead-letter topic can be pulled later.
    publisher.publish(topic(names["dead_letter"]), b"not json").result(timeout=30)
    keep = subscriber.subscription_path(PROJECT, f"{names['dead_letter']}-keep")
    pulled = subscriber.pull(subscription=keep, max_messages=10, timeout=30)
    assert [m.message.data for m in pulled.received_messages] == [b"not json"]

    second = run_deploy(*args, config=tmp_path / "gcloud")
    assert second.returncode == 0, second.stderr
    assert "summary: did 0, skipped 11" in second.stderr
    assert "did:" not in second.stderr

    # Drift: another endpoint and attempt limit update both push subscriptions, nothing else.
    moved = list(args)
    moved[moved.index("--push-endpoint") + 1] = "http://127.0.0.1:11"
    third = run_deploy(*moved, "--max-delivery-attempts", "7", config=tmp_path / "gcloud")
    assert third.returncode == 0, third.stderr
    assert f"did: update push subscription {names['push']}" in third.stderr
    assert f"did: update push subscription {names['feedback_push']}" in third.stderr
    assert "summary: did 2, skipped 9" in third.stderr
    push = subscription(names["push"])
    assert push.push_config.push_endpoint == (
        f"http://127.0.0.1:11/projects/{PROJECT}/topics/{names['transactions']}"
    )
    assert push.dead_letter_policy.max_delivery_attempts == 7

    removed = run_deploy(*args, "--delete", config=tmp_path / "gcloud")
    assert removed.returncode == 0, removed.stderr
    # The worker's subscriptions were never made: reported absent.
    assert "summary: did 3, skipped 2" in removed.stderr
    with pytest.raises(NotFound):
        publisher.get_topic(topic=topic(names["transactions"]))
    with pytest.raises(NotFound):
        subscription(names["push"])


@pytest.mark.integration
def test_failing_step_lists_the_steps_done(
    emulator: str, pubsub_env: dict[str, str], names: dict[str, str], tmp_path: Path
) -> None:
    """A step that cannot succeed is named, the run stops non-zero and lists what it had done."""
    from google.cloud import pubsub_v1

    publisher = pubsub_v1.PublisherClient()
    subscriber = pubsub_v1.SubscriberClient()
    other = publisher.create_topic(name=publisher.topic_path(PROJECT, services.unique("other")))
    taken = services.unique("taken")
    subscriber.create_subscription(
        name=subscriber.subscription_path(PROJECT, taken), topic=other.name
    )
    result = run_deploy(
        "--emulator", emulator, "--project", PROJECT,
        "--transactions-topic", names["transactions"], "--results-topic", names["results"],
        "--dead-letter-topic", names["dead_letter"], "--feedback-topic", names["feedback"],
        "--feedback-dead-letter-topic", names["feedback_dead_letter"],
        "--watch-subscription", taken, config=tmp_path / "gcloud",
    )  # fmt: skip
    assert result.returncode == 1
    assert f'step "subscription {taken}" failed: it exists on topic' in result.stderr
    assert "steps finished before the failure" in result.stderr
    assert f"did: create topics {names['transactions']} {names['results']}" in result.stderr
    assert f"did: create subscription {names['dead_letter']}-keep" in result.stderr
    assert "summary:" not in result.stderr


# ---------------------------------------------------------------------------- packaged source


@pytest.fixture()
def packaged(tmp_path: Path) -> Path:
    """The upload as deploy.sh assembles it."""
    upload = tmp_path / "upload"
    result = run_deploy("--package", str(upload), config=tmp_path / "gcloud")
    assert result.returncode == 0, result.stderr
    return upload


def test_package_holds_only_what_the_functions_need(packaged: Path) -> None:
    """The upload has main.py, requirements.txt, .gcloudignore and detector/ without tests or caches."""
    files = {p.relative_to(packaged).as_posix() for p in packaged.rglob("*") if p.is_file()}
    assert {"main.py", "requirements.txt", ".gcloudignore", "detector/__init__.py"} <= files
    assert not [f for f in files if f.startswith("detector/offline/")]
    assert not [f for f in files if "__pycache__" in f or f.endswith(".pyc") or "tests/" in f]
    # The C walk is built for this machine, not the function's: the upload walks in Python.
    assert not [f for f in files if f.endswith((".so", ".c", ".pyi"))]
    assert all(f.startswith("detector/") or "/" not in f for f in files)
    assert (packaged / "requirements.txt").read_text() == (ROOT / "requirements.txt").read_text()
    assert (
        "from detector.main import detect_fraud, record_feedback, score_transaction"
        in (packaged / "main.py").read_text()
    )


def test_package_leaves_out_the_offline_subpackage(clone: Path, tmp_path: Path) -> None:
    """Replay, training and evaluation (detector/offline) never reach a function; the rest does."""
    for name in (
        "offline/__init__.py",
        "offline/replay.py",
        "state/__init__.py",
        "state/tests/x.py",
    ):
        path = clone / "detector" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")
    (clone / "detector" / "state" / "_history.c").write_text("")
    upload = tmp_path / "upload"
    result = run_deploy(
        "--package", str(upload), config=tmp_path / "gcloud", script=clone / "deploy.sh"
    )
    assert result.returncode == 0, result.stderr
    files = {p.relative_to(upload).as_posix() for p in upload.rglob("*") if p.is_file()}
    assert "detector/state/__init__.py" in files
    assert not [f for f in files if "offline" in f or "/tests/" in f or f.endswith(".c")]
    assert {"main.py", "requirements.txt"} <= files


def test_package_refuses_to_replace_a_foreign_directory(tmp_path: Path) -> None:
    """--package never deletes a non-empty directory it did not make."""
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    result = run_deploy("--package", str(precious), config=tmp_path / "gcloud")
    assert result.returncode == 1
    assert "was not made by deploy.sh" in result.stderr
    assert (precious / "notes.txt").read_text() == "keep me"


@pytest.fixture()
def upload_server(packaged: Path, tmp_path: Path) -> Iterator[str]:
    """The upload installed into a fresh virtualenv and served by its own functions-framework."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "--quiet", "-r", str(packaged / "requirements.txt")],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert pip.returncode == 0, pip.stderr[-3000:]
    port = services.free_port()
    # Run from elsewhere with a bare environment: only the upload can provide `detector`.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    process = services.start(
        [str(venv / "bin" / "functions-framework"), "--source", str(packaged / "main.py"),
         "--target", "score_transaction", "--signature-type", "http",
         "--host", "127.0.0.1", "--port", str(port)],
        tmp_path / "upload-server.log",
        env={"PATH": os.environ["PATH"], "HOME": str(tmp_path), "GOOGLE_CLOUD_PROJECT": PROJECT},
        cwd=elsewhere,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        services.wait_http(url + "/", process, timeout=60)
        yield url
    finally:
        process.stop()


@pytest.mark.integration
def test_packaged_source_serves_the_blog_example(upload_server: str) -> None:
    """The upload installs into a fresh venv and score_transaction blocks the blog's example."""
    response = requests.post(
        upload_server + "/",
        json={"amount": 1200, "merchant": "XYZ Corp", "customer_id": "12345"},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    verdict = response.json()
    assert verdict["is_fraud"] is True
    assert verdict["decision"] == "block"
    assert verdict["customer_id"] == "12345"
