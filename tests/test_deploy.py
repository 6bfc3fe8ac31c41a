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


SA = "fraud-detector@fraud-proj.iam.gserviceaccount.com"
AGENT = "serviceAccount:service-PROJECT_NUMBER@gcp-sa-pubsub.iam.gserviceaccount.com"
POLICY = "'--flatten=bindings[].members' '--format=csv[no-heading](bindings.role,bindings.members)'"
TOPICS_LIST = "'--format=csv[no-heading](name.basename(),schemaSettings.schema.basename(),schemaSettings.encoding)'"
SUBS_LIST = "'--format=csv[no-heading](name.basename(),topic.basename(),pushConfig.pushEndpoint,deadLetterPolicy.deadLetterTopic.basename(),deadLetterPolicy.maxDeliveryAttempts,retryPolicy.minimumBackoff,retryPolicy.maximumBackoff)'"
COMMON_DEPLOY = (
    f"--run-service-account={SA} --memory=512Mi --cpu=1 --concurrency=8 --max-instances=10 "
    "--min-instances=0 --timeout=60s --set-env-vars=GOOGLE_CLOUD_PROJECT=fraud-proj,"
    "RESULTS_TOPIC=fraud-verdicts,DEAD_LETTER_TOPIC=transactions-dead-letter"
)

EXPECTED_DEPLOY = f"""\
# stage the function source in {{staging}} (done locally, also in a dry run)
# enable APIs
gcloud services list --enabled --project=fraud-proj '--format=value(config.name)'
gcloud services enable cloudfunctions.googleapis.com run.googleapis.com cloudbuild.googleapis.com eventarc.googleapis.com pubsub.googleapis.com artifactregistry.googleapis.com iam.googleapis.com --project=fraud-proj
# find the Pub/Sub service agent
gcloud projects describe fraud-proj '--format=value(projectNumber)'
# topics
gcloud pubsub topics list --project=fraud-proj {TOPICS_LIST}
gcloud pubsub topics create transactions fraud-verdicts transactions-dead-letter fraud-feedback --project=fraud-proj
# dead-letter subscription
gcloud pubsub subscriptions list --project=fraud-proj {SUBS_LIST}
gcloud pubsub subscriptions create transactions-dead-letter-keep --project=fraud-proj --topic=transactions-dead-letter --expiration-period=never
# service account
gcloud iam service-accounts list --project=fraud-proj '--format=value(email)'
gcloud iam service-accounts create fraud-detector --project=fraud-proj '--display-name=Fraud detector functions' '--description=Runs the fraud detector functions; created by deploy.sh'
# publish permissions
gcloud pubsub topics get-iam-policy fraud-verdicts --project=fraud-proj {POLICY}
gcloud pubsub topics add-iam-policy-binding fraud-verdicts --project=fraud-proj --member=serviceAccount:{SA} --role=roles/pubsub.publisher
gcloud pubsub topics get-iam-policy transactions-dead-letter --project=fraud-proj {POLICY}
gcloud pubsub topics add-iam-policy-binding transactions-dead-letter --project=fraud-proj --member=serviceAccount:{SA} --role=roles/pubsub.publisher
gcloud pubsub topics add-iam-policy-binding transactions-dead-letter --project=fraud-proj --member={AGENT} --role=roles/pubsub.publisher
gcloud iam service-accounts get-iam-policy {SA} --project=fraud-proj {POLICY}
gcloud iam service-accounts add-iam-policy-binding {SA} --project=fraud-proj --member={AGENT} --role=roles/iam.serviceAccountTokenCreator
# functions
gcloud functions list --v2 --project=fraud-proj --regions=europe-west1 '--format=csv[no-heading](name.basename(),labels.config_digest)'
gcloud functions deploy detect-fraud --gen2 --project=fraud-proj --region=europe-west1 --runtime=python311 --source={{staging}} --entry-point=detect_fraud --trigger-topic=transactions --retry --trigger-service-account={SA} {COMMON_DEPLOY} --update-labels=config_digest=DIGEST --quiet
gcloud functions deploy record-feedback --gen2 --project=fraud-proj --region=europe-west1 --runtime=python311 --source={{staging}} --entry-point=record_feedback --trigger-topic=fraud-feedback --retry --trigger-service-account={SA} {COMMON_DEPLOY},FEEDBACK_TOPIC=fraud-feedback --update-labels=config_digest=DIGEST --quiet
gcloud functions deploy score-transaction --gen2 --project=fraud-proj --region=europe-west1 --runtime=python311 --source={{staging}} --entry-point=score_transaction --trigger-http --no-allow-unauthenticated {COMMON_DEPLOY} --update-labels=config_digest=DIGEST --quiet
# dead-letter policies of the triggers
gcloud functions describe detect-fraud --v2 --project=fraud-proj --region=europe-west1 '--format=value(eventTrigger.trigger)'
gcloud eventarc triggers describe DETECT_FRAUD_TRIGGER --project=fraud-proj --location=europe-west1 '--format=value(transport.pubsub.subscription)'
gcloud pubsub subscriptions describe DETECT_FRAUD_SUBSCRIPTION --project=fraud-proj '--format=csv[no-heading](deadLetterPolicy.deadLetterTopic.basename(),deadLetterPolicy.maxDeliveryAttempts)'
gcloud pubsub subscriptions update DETECT_FRAUD_SUBSCRIPTION --project=fraud-proj --dead-letter-topic=transactions-dead-letter --max-delivery-attempts=5
gcloud pubsub subscriptions get-iam-policy DETECT_FRAUD_SUBSCRIPTION --project=fraud-proj {POLICY}
gcloud pubsub subscriptions add-iam-policy-binding DETECT_FRAUD_SUBSCRIPTION --project=fraud-proj --member={AGENT} --role=roles/pubsub.subscriber
gcloud run services get-iam-policy detect-fraud --project=fraud-proj --region=europe-west1 {POLICY}
gcloud functions add-invoker-policy-binding detect-fraud --project=fraud-proj --region=europe-west1 --member=serviceAccount:{SA}
gcloud functions describe record-feedback --v2 --project=fraud-proj --region=europe-west1 '--format=value(eventTrigger.trigger)'
gcloud eventarc triggers describe RECORD_FEEDBACK_TRIGGER --project=fraud-proj --location=europe-west1 '--format=value(transport.pubsub.subscription)'
gcloud pubsub subscriptions describe RECORD_FEEDBACK_SUBSCRIPTION --project=fraud-proj '--format=csv[no-heading](deadLetterPolicy.deadLetterTopic.basename(),deadLetterPolicy.maxDeliveryAttempts)'
gcloud pubsub subscriptions update RECORD_FEEDBACK_SUBSCRIPTION --project=fraud-proj --dead-letter-topic=transactions-dead-letter --max-delivery-attempts=5
gcloud pubsub subscriptions get-iam-policy RECORD_FEEDBACK_SUBSCRIPTION --project=fraud-proj {POLICY}
gcloud pubsub subscriptions add-iam-policy-binding RECORD_FEEDBACK_SUBSCRIPTION --project=fraud-proj --member={AGENT} --role=roles/pubsub.subscriber
gcloud run services get-iam-policy record-feedback --project=fraud-proj --region=europe-west1 {POLICY}
gcloud functions add-invoker-policy-binding record-feedback --project=fraud-proj --region=europe-west1 --member=serviceAccount:{SA}
"""

EXPECTED_DELETE = f"""\
# functions
gcloud functions list --v2 --project=fraud-proj --regions=europe-west1 '--format=csv[no-heading](name.basename(),labels.config_digest)'
gcloud functions delete detect-fraud --project=fraud-proj --region=europe-west1 --quiet
gcloud functions delete record-feedback --project=fraud-proj --region=europe-west1 --quiet
gcloud functions delete score-transaction --project=fraud-proj --region=europe-west1 --quiet
# subscriptions
gcloud pubsub subscriptions list --project=fraud-proj {SUBS_LIST}
gcloud pubsub subscriptions delete transactions-dead-letter-keep --project=fraud-proj --quiet
# topics
gcloud pubsub topics list --project=fraud-proj {TOPICS_LIST}
gcloud pubsub topics delete transactions fraud-verdicts transactions-dead-letter fraud-feedback --project=fraud-proj --quiet
# schema
gcloud pubsub schemas list --project=fraud-proj '--format=value(name.basename())'
gcloud pubsub schemas delete transaction-schema --project=fraud-proj --quiet
# service account
gcloud iam service-accounts list --project=fraud-proj '--format=value(email)'
gcloud iam service-accounts delete {SA} --project=fraud-proj --quiet
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
gcloud pubsub topics create fraud-verdicts transactions-dead-letter fraud-feedback --project=fraud-test
# subscriptions
gcloud pubsub subscriptions list --project=fraud-test {SUBS_LIST}
gcloud pubsub subscriptions create transactions-dead-letter-keep --project=fraud-test --topic=transactions-dead-letter --expiration-period=never
gcloud pubsub subscriptions create fraud-verdicts-watch --project=fraud-test --topic=fraud-verdicts --expiration-period=never
gcloud pubsub subscriptions create detect-fraud-push --project=fraud-test --topic=transactions --push-endpoint=http://127.0.0.1:8080/projects/fraud-test/topics/transactions --dead-letter-topic=transactions-dead-letter --max-delivery-attempts=5 --min-retry-delay=1s --max-retry-delay=10s
gcloud pubsub subscriptions create record-feedback-push --project=fraud-test --topic=fraud-feedback --push-endpoint=http://127.0.0.1:8081/projects/fraud-test/topics/fraud-feedback --dead-letter-topic=transactions-dead-letter --max-delivery-attempts=5 --min-retry-delay=1s --max-retry-delay=10s
"""

EMULATOR_ARGS = (
    "--emulator", "127.0.0.1:8085", "--project", PROJECT, "--with-schema",
    "--push-endpoint", "http://127.0.0.1:8080", "--feedback-push-endpoint", "http://127.0.0.1:8081/",
)  # fmt: skip

OPTIONS_ARGS = (
    "--project", "fraud-proj", "--region", "us-central1", "--transactions-topic", "tx-in",
    "--results-topic", "tx-out", "--dead-letter-topic", "tx-dead", "--feedback-topic", "tx-labels",
    "--service-account", "fraud-fn", "--memory", "1Gi", "--cpu", "2", "--concurrency", "40",
    "--max-instances", "3", "--min-instances", "1", "--timeout", "120s",
    "--max-delivery-attempts", "10", "--allow-unauthenticated",
    "--redis-url", "redis://10.0.0.3:6379/0", "--vpc-connector", "fraud-connector",
    "--model-path", "none", "--with-schema", "--schema-name", "tx-schema",
)  # fmt: skip


def test_dry_run_prints_the_deployment_commands(tmp_path: Path) -> None:
    """A default dry run prints exactly the expected gcloud commands, in order."""
    staging = tmp_path / "upload"
    output = dry_run(
        tmp_path,
        "--project",
        "fraud-proj",
        "--region",
        "europe-west1",
        "--staging-dir",
        str(staging),
    )
    assert output == EXPECTED_DEPLOY.format(staging=staging)


def test_dry_run_with_options(tmp_path: Path) -> None:
    """Names, sizes, Redis, access and schema options end up in the right commands."""
    staging = tmp_path / "upload"
    rules = tmp_path / "strict.yaml"
    rules.write_text("rules: []\n")
    output = dry_run(
        tmp_path, *OPTIONS_ARGS, "--rules-file", str(rules), "--staging-dir", str(staging)
    )
    sa = "fraud-fn@fraud-proj.iam.gserviceaccount.com"
    env = "--set-env-vars=GOOGLE_CLOUD_PROJECT=fraud-proj,RESULTS_TOPIC=tx-out,DEAD_LETTER_TOPIC=tx-dead"
    extra = "RULES_FILE=config/strict.yaml,MODEL_PATH=none,REDIS_URL=redis://10.0.0.3:6379/0"
    sizes = (
        "--memory=1Gi --cpu=2 --concurrency=40 --max-instances=3 --min-instances=1 --timeout=120s"
    )
    network = "--vpc-connector=fraud-connector --egress-settings=private-ranges-only"
    head = "--gen2 --project=fraud-proj --region=us-central1 --runtime=python311"
    expected = [
        "gcloud pubsub schemas create tx-schema --project=fraud-proj --type=avro "
        f"--definition-file={ROOT}/schemas/transaction.avsc",
        "gcloud pubsub topics create tx-in --project=fraud-proj --schema=tx-schema --message-encoding=json",
        "gcloud pubsub topics create tx-out tx-dead tx-labels --project=fraud-proj",
        "gcloud pubsub subscriptions create tx-dead-keep --project=fraud-proj --topic=tx-dead "
        "--expiration-period=never",
        f"gcloud functions deploy detect-fraud {head} --source={staging} --entry-point=detect_fraud "
        f"--trigger-topic=tx-in --retry --trigger-service-account={sa} --run-service-account={sa} "
        f"{sizes} {env},{extra} {network} --update-labels=config_digest=DIGEST --quiet",
        f"gcloud functions deploy record-feedback {head} --source={staging} "
        f"--entry-point=record_feedback --trigger-topic=tx-labels --retry "
        f"--trigger-service-account={sa} --run-service-account={sa} {sizes} "
        f"{env},FEEDBACK_TOPIC=tx-labels,{extra} {network} --update-labels=config_digest=DIGEST --quiet",
        f"gcloud functions deploy score-transaction {head} --source={staging} "
        f"--entry-point=score_transaction --trigger-http --allow-unauthenticated "
        f"--run-service-account={sa} {sizes} {env},{extra} {network} "
        "--update-labels=config_digest=DIGEST --quiet",
        "gcloud pubsub subscriptions update DETECT_FRAUD_SUBSCRIPTION --project=fraud-proj "
        "--dead-letter-topic=tx-dead --max-delivery-attempts=10",
    ]
    lines = output.splitlines()
    for line in expected:
        assert line in lines
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
        "--dry-run", "--project", "fraud-proj", "--region", "europe-west1",
        "--staging-dir", str(tmp_path / "upload"), config=tmp_path / "gcloud",
        path=tools_path(tmp_path),
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
        "--dry-run", "--project", "fraud-proj", "--region", "europe-west1",
        "--staging-dir", str(clone.parent / staging), *args, config=clone.parent / "gcloud",
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
        dry_run(tmp_path, "--project", "fraud-proj", "--region", "europe-west1",
                "--staging-dir", str(tmp_path / "a"), mask=False),
        dry_run(tmp_path, *OPTIONS_ARGS, "--staging-dir", str(tmp_path / "b"), mask=False),
        dry_run(tmp_path, "--delete", "--project", "fraud-proj", "--region", "europe-west1"),
        dry_run(tmp_path, *EMULATOR_ARGS),
        dry_run(tmp_path, "--delete", "--emulator", "127.0.0.1:8085", "--project", PROJECT),
    ]  # fmt: skip
    commands = sorted({line for output in outputs for line in gcloud_lines(output)})
    assert len(commands) > 80
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
    ],
)  # fmt: skip
def test_bad_arguments_are_named(tmp_path: Path, args: list[str], message: str) -> None:
    """A bad or missing option stops before any step, naming the option and the problem."""
    result = run_deploy(*args, config=tmp_path / "gcloud")
    assert result.returncode == 2
    assert message in result.stderr
    assert result.stdout == ""


def test_no_gcloud_is_an_error(tmp_path: Path) -> None:
    """Without gcloud on PATH a real run names the missing tool and exits non-zero."""
    result = run_deploy(
        "--project", "fraud-proj", "--region", "europe-west1",
        config=tmp_path / "gcloud", path=tools_path(tmp_path),
    )  # fmt: skip
    assert result.returncode == 1
    assert 'step "find gcloud" failed: gcloud is not on PATH' in result.stderr
    assert "no step had finished" in result.stderr


def test_failing_gcloud_step_is_named(tmp_path: Path) -> None:
    """With no account the first gcloud step fails: it is named, with gcloud's reason."""
    result = run_deploy(
        "--project", "fraud-proj", "--region", "europe-west1",
        "--staging-dir", str(tmp_path / "upload"), config=tmp_path / "gcloud", offline=True,
    )  # fmt: skip
    assert result.returncode == 1
    assert 'step "list enabled APIs" failed' in result.stderr
    assert NO_ACCOUNT in result.stderr
    assert "no step had finished" in result.stderr


def test_shellcheck() -> None:
    """deploy.sh is shellcheck-clean."""
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (Debian package shellcheck); CI installs it")
    result = subprocess.run([shellcheck, str(DEPLOY)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout


# ---------------------------------------------------------------------------- emulator


@pytest.fixture()
def names() -> dict[str, str]:
    return {
        "transactions": services.unique("tx"),
        "results": services.unique("verdicts"),
        "dead_letter": services.unique("dead"),
        "feedback": services.unique("feedback"),
        "push": services.unique("detect-push"),
        "feedback_push": services.unique("feedback-push"),
        "schema": services.unique("schema"),
    }


def emulator_args(emulator: str, names: dict[str, str]) -> list[str]:
    return [
        "--emulator", emulator, "--project", PROJECT,
        "--transactions-topic", names["transactions"], "--results-topic", names["results"],
        "--dead-letter-topic", names["dead_letter"], "--feedback-topic", names["feedback"],
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
    assert "summary: did 7, skipped 0" in first.stderr

    def topic(name: str) -> str:
        return publisher.topic_path(PROJECT, name)

    def subscription(name: str) -> pubsub_v1.types.Subscription:
        return subscriber.get_subscription(subscription=subscriber.subscription_path(PROJECT, name))

    transactions = publisher.get_topic(topic=topic(names["transactions"]))
    assert transactions.schema_settings.schema == f"projects/{PROJECT}/schemas/{names['schema']}"
    assert transactions.schema_settings.encoding == Encoding.JSON
    for key in ("results", "dead_letter", "feedback"):
        assert not publisher.get_topic(topic=topic(names[key])).schema_settings.schema

    for key, endpoint, source in [
        ("push", "http://127.0.0.1:9", "transactions"),
        ("feedback_push", "http://127.0.0.1:10", "feedback"),
    ]:
        push = subscription(names[key])
        assert push.topic == topic(names[source])
        assert push.push_config.push_endpoint == (
            f"{endpoint}/projects/{PROJECT}/topics/{names[source]}"
        )
        assert push.dead_letter_policy.dead_letter_topic == topic(names["dead_letter"])
        assert push.dead_letter_policy.max_delivery_attempts == 5
        assert push.retry_policy.minimum_backoff == timedelta(seconds=1)
        assert push.retry_policy.maximum_backoff == timedelta(seconds=10)

    for name, source in [
        (f"{names['dead_letter']}-keep", "dead_letter"),
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
    assert "summary: did 0, skipped 9" in second.stderr
    assert "did:" not in second.stderr

    # Drift: another endpoint and attempt limit update both push subscriptions, nothing else.
    moved = list(args)
    moved[moved.index("--push-endpoint") + 1] = "http://127.0.0.1:11"
    third = run_deploy(*moved, "--max-delivery-attempts", "7", config=tmp_path / "gcloud")
    assert third.returncode == 0, third.stderr
    assert f"did: update push subscription {names['push']}" in third.stderr
    assert f"did: update push subscription {names['feedback_push']}" in third.stderr
    assert "summary: did 2, skipped 7" in third.stderr
    push = subscription(names["push"])
    assert push.push_config.push_endpoint == (
        f"http://127.0.0.1:11/projects/{PROJECT}/topics/{names['transactions']}"
    )
    assert push.dead_letter_policy.max_delivery_attempts == 7

    removed = run_deploy(*args, "--delete", config=tmp_path / "gcloud")
    assert removed.returncode == 0, removed.stderr
    assert "summary: did 3, skipped 0" in removed.stderr
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
    assert {"main.py", "requirements.txt", ".gcloudignore", "detector/main.py"} <= files
    assert not [f for f in files if "__pycache__" in f or f.endswith(".pyc") or "tests/" in f]
    # The C walk is built for this machine, not the function's: the upload walks in Python.
    assert not [f for f in files if f.endswith((".so", ".c", ".pyi"))]
    assert all(f.startswith("detector/") or "/" not in f for f in files)
    assert (packaged / "requirements.txt").read_text() == (ROOT / "requirements.txt").read_text()
    assert (
        "from detector.main import detect_fraud, record_feedback, score_transaction"
        in (packaged / "main.py").read_text()
    )


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
