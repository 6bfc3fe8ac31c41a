#!/usr/bin/env bash
# deploy.sh: provision Pub/Sub and shared state, and deploy the fraud detector's Cloud
# Functions (2nd gen), or its streaming-pull worker as a Cloud Run worker pool (--worker).
#
# Every step checks before it changes anything, so running it again only does what is
# missing or different and says what it skipped. --dry-run prints every gcloud command
# (the read-only checks too) and runs none. --emulator provisions the same topics and
# subscriptions on a local Pub/Sub emulator. --package DIR only assembles the upload.
# Secrets (the Redis URL, an AUTH string) reach gcloud on stdin and are never printed.
# Run ./deploy.sh --help for the options; docs/deploy.md explains what gets created.

set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PROG=deploy.sh

# Google APIs every deployment uses; iam creates the service accounts. deploy_cloud adds
# those of Direct VPC egress and of the Memorystore instance when they are used.
REQUIRED_APIS=(
  cloudfunctions.googleapis.com
  run.googleapis.com
  cloudbuild.googleapis.com
  eventarc.googleapis.com
  pubsub.googleapis.com
  artifactregistry.googleapis.com
  iam.googleapis.com
  secretmanager.googleapis.com
)

# Function names (deployed) and entry points (in detector/main.py).
DETECT_FUNCTION=detect-fraud
FEEDBACK_FUNCTION=record-feedback
SCORE_FUNCTION=score-transaction
DIGEST_LABEL=config_digest
STAGING_MARKER=.deploy-staging

# ---------------------------------------------------------------------------- options
MODE=deploy # deploy | delete | package
DRY_RUN=0
PROJECT=""
REGION=""
EMULATOR=""
TRANSACTIONS_TOPIC=transactions
RESULTS_TOPIC=fraud-verdicts
DEAD_LETTER_TOPIC=transactions-dead-letter
FEEDBACK_TOPIC=fraud-feedback
FEEDBACK_DEAD_LETTER_TOPIC=fraud-feedback-dead-letter
DEAD_LETTER_SUBSCRIPTION=""          # default: <dead-letter topic>-keep
FEEDBACK_DEAD_LETTER_SUBSCRIPTION="" # default: <feedback dead-letter topic>-keep
WATCH_SUBSCRIPTION=""                # default: <results topic>-watch (emulator only)
PUSH_ENDPOINT=""
FEEDBACK_PUSH_ENDPOINT=""
PUSH_SUBSCRIPTION=detect-fraud-push
FEEDBACK_PUSH_SUBSCRIPTION=record-feedback-push
WITH_SCHEMA=0
RECORD_ALL=0 # STATE_RECORD=all: state keeps every entity, not only those rules and model read
SCHEMA_NAME=transaction-schema
SCHEMA_FILE="$ROOT/schemas/transaction.avsc"
SERVICE_ACCOUNT=fraud-detector # prefix of the per-function account ids
RUNTIME=python311
MEMORY=512Mi
CPU=1
CONCURRENCY=8
MAX_INSTANCES=10
MIN_INSTANCES=0
TIMEOUT=60s
# Delivery policy: empty means the mode's default (validate). Deployed, it rides out a
# 15-minute outage (docs/deploy.md has the arithmetic); on the emulator it is short so
# local runs see dead letters within seconds.
MAX_DELIVERY_ATTEMPTS=""
MIN_RETRY_DELAY=""
MAX_RETRY_DELAY=""
ALLOW_UNAUTHENTICATED=0
# Shared state: exactly one of REDIS_URL, REDIS_SECRET, CREATE_REDIS for a deployment.
REDIS_URL=""
REDIS_SECRET=""                 # NAME[:VERSION] of an existing secret holding the URL
REDIS_SECRET_NAME=fraud-redis-url # the secret deploy.sh writes the URL to
CREATE_REDIS=""
REDIS_ENGINE=valkey
REDIS_CLUSTER=0
NETWORK=""
SUBNET=""
VPC_EGRESS=private-ranges-only
VPC_CONNECTOR=""
EGRESS_SETTINGS=private-ranges-only
RULES_FILE=""
MODEL_PATH=""
STAGING_DIR="$ROOT/build/function-source"
PACKAGE_DIR=""
FORCE=0
WORKER=0
WORKER_POOL=fraud-worker
WORKER_SUBSCRIPTION=fraud-worker
WORKER_FEEDBACK_SUBSCRIPTION=fraud-worker-feedback
WORKER_IMAGE=""
WORKER_INSTANCES=1

usage() {
  cat <<EOF
Usage:
  ./deploy.sh --project P --region R --redis-url URL [options]   deploy to Google Cloud
  ./deploy.sh --project P --region R --create-redis NAME [...]   ... with a new Memorystore
  ./deploy.sh --project P --region R --delete                    remove what deploy created
  ./deploy.sh --emulator HOST:PORT --project P [...]             provision a Pub/Sub emulator
  ./deploy.sh --package DIR                                      only assemble the upload in DIR

Modes:
  --dry-run                 print every gcloud command (checks included), run none
  --delete                  delete functions, worker pool, subscriptions, topics, schema,
                            service accounts and the URL secret deploy.sh wrote
  --emulator HOST:PORT      topics and subscriptions on the Pub/Sub emulator, no functions
  --package DIR             write the function source upload to DIR and exit
  --worker                  a streaming-pull worker pool decides transactions and records
                            labels instead of $DETECT_FUNCTION and $FEEDBACK_FUNCTION

Shared state (a deployment needs one: each instance would otherwise keep its own memory):
  --redis-url URL           store URL in Secret Manager ($REDIS_SECRET_NAME) and use it
  --redis-secret NAME[:VERSION]  use an existing secret holding the URL [VERSION: latest]
  --redis-secret-name NAME  [$REDIS_SECRET_NAME] the secret --redis-url/--create-redis write
  --create-redis NAME       create (or reuse) a Memorystore instance NAME with AUTH and TLS
  --redis-engine E          valkey or redis [$REDIS_ENGINE]
  --redis-cluster           cluster mode (Valkey cluster mode, or Memorystore for Redis Cluster)
  --network NAME            Direct VPC egress into this VPC network [default with --create-redis]
  --subnet NAME             its subnet in the region [default with --create-redis]
  --vpc-egress E            [$VPC_EGRESS] or all-traffic, with --network
  --vpc-connector NAME      Serverless VPC Access connector instead of Direct VPC egress
  --egress-settings S       [$EGRESS_SETTINGS] or all, with --vpc-connector

Names (all overridable so tests can use fresh ones):
  --transactions-topic NAME       [$TRANSACTIONS_TOPIC]
  --results-topic NAME            [$RESULTS_TOPIC]
  --dead-letter-topic NAME        [$DEAD_LETTER_TOPIC] transactions that cannot be decided
  --feedback-topic NAME           [$FEEDBACK_TOPIC]
  --feedback-dead-letter-topic NAME [$FEEDBACK_DEAD_LETTER_TOPIC] labels that cannot be recorded
  --dead-letter-subscription NAME [<dead-letter topic>-keep]
  --feedback-dead-letter-subscription NAME [<feedback dead-letter topic>-keep]
  --watch-subscription NAME       [<results topic>-watch] (emulator only)
  --push-subscription NAME        [$PUSH_SUBSCRIPTION] (emulator only)
  --feedback-push-subscription NAME [$FEEDBACK_PUSH_SUBSCRIPTION] (emulator only)
  --service-account PREFIX        [$SERVICE_ACCOUNT] accounts PREFIX-detect, -feedback, -score,
                                  -push (the triggers' identity) and -worker
  --worker-pool NAME              [$WORKER_POOL]
  --worker-subscription NAME      [$WORKER_SUBSCRIPTION] the worker's pull subscription
  --worker-feedback-subscription NAME [$WORKER_FEEDBACK_SUBSCRIPTION]

Delivery (dead-letter and retry policy of every subscription that feeds the detector):
  --max-delivery-attempts N  deliveries before the dead-letter topic (5-100) [10; emulator 5]
  --min-retry-delay Ns, --max-retry-delay Ns  backoff, 0-600 s [10s, 600s; emulator 1s, 10s]

Emulator:
  --push-endpoint URL             push transactions to URL/projects/P/topics/<topic>
  --feedback-push-endpoint URL    push feedback to URL/projects/P/topics/<feedback topic>
  --worker                        create the worker's pull subscriptions instead

Schema:
  --with-schema             attach the Avro schema to the transactions topic (JSON encoding)
  --schema-name NAME        [$SCHEMA_NAME]
  --schema-file FILE        [schemas/transaction.avsc]

Functions and worker:
  --runtime R [$RUNTIME]  --memory M [$MEMORY]  --cpu C [$CPU]  --concurrency N [$CONCURRENCY]
  --max-instances N [$MAX_INSTANCES]  --min-instances N [$MIN_INSTANCES]  --timeout D [$TIMEOUT]
  --allow-unauthenticated   make $SCORE_FUNCTION public (default: IAM-authenticated callers only)
  --rules-file FILE         ruleset to upload (RULES_FILE); default: the bundled one
  --model-path FILE|none    model to upload (MODEL_PATH); default: the bundled one
  --record-all              state keeps every entity and attribute (STATE_RECORD=all), not
                            only those the rules and model read
  --staging-dir DIR         where the upload is assembled [build/function-source]
  --worker-image IMAGE      deploy this image (built from ./Dockerfile) instead of the source
  --worker-instances N      [$WORKER_INSTANCES] instances of the worker pool (--memory, --cpu apply)
  --force                   redeploy functions and worker even when nothing changed
EOF
}

# ---------------------------------------------------------------------------- output
# Values that must never be printed: the Redis URL and anything read from Secret Manager or
# Memorystore. redact replaces them, and the password of any redis:// URL, in printed text.
SECRETS=()

redact() {
  local text=$1 secret
  for secret in ${SECRETS[@]+"${SECRETS[@]}"}; do
    [[ -n $secret ]] && text=${text//"$secret"/<secret>}
  done
  printf '%s' "$text" | sed -E 's#(rediss?://[^:/@[:space:]]*:)[^@[:space:]]+@#\1***@#g'
}

say() { printf '%s: %s\n' "$PROG" "$(redact "$*")" >&2; }

usage_error() {
  printf '%s: error: %s\n' "$PROG" "$(redact "$*")" >&2
  printf "Run './deploy.sh --help' for the options.\n" >&2
  exit 2
}

# Quote words the way Python's shlex.quote does, so printed commands can be pasted.
quote() {
  local arg safe='^[A-Za-z0-9_@%+=:,./-]+$' words=()
  for arg in "$@"; do
    if [[ $arg =~ $safe ]]; then
      words+=("$arg")
    else
      words+=("'${arg//\'/\'\"\'\"\'}'")
    fi
  done
  printf '%s' "${words[*]}"
}

# Finished steps, in order, for the summary and for the report when a step fails.
FINISHED=()
CHANGED_COUNT=0
UNCHANGED_COUNT=0
PRINTED_COUNT=0

changed() {
  FINISHED+=("did: $1")
  CHANGED_COUNT=$((CHANGED_COUNT + 1))
  ((DRY_RUN)) || say "did: $1"
}

unchanged() {
  FINISHED+=("skipped: $1")
  UNCHANGED_COUNT=$((UNCHANGED_COUNT + 1))
  ((DRY_RUN)) || say "skipped: $1"
}

list_finished() {
  local item
  if ((${#FINISHED[@]} == 0)); then
    say "no step had finished; nothing was changed."
    return
  fi
  say "steps finished before the failure (nothing is rolled back; run again to resume):"
  for item in "${FINISHED[@]}"; do
    say "  $item"
  done
}

# fail STEP DETAIL...: name the step that failed, show why, list what was done, exit 1.
fail() {
  local step=$1
  shift
  printf '%s: error: step "%s" failed: %s\n' "$PROG" "$step" "$(redact "$1")" >&2
  shift
  local line
  for line in "$@"; do
    if [[ -n $line ]]; then
      redact "$line" | sed 's/^/    /' >&2
      printf '\n' >&2
    fi
  done
  list_finished
  exit 1
}

section() {
  if ((DRY_RUN)); then
    printf '# %s\n' "$1"
  fi
}

emit() {
  printf '%s\n' "$(redact "$(quote "$@")")"
  PRINTED_COUNT=$((PRINTED_COUNT + 1))
}

WORK=""
cleanup() {
  if [[ -n $WORK ]]; then rm -rf "$WORK"; fi
}
trap cleanup EXIT

# query STEP DRY_VALUE COMMAND...: run a read-only command and put its stdout in OUT.
# In a dry run the command is printed and OUT is DRY_VALUE. A failure ends the run.
OUT=""
query() {
  local step=$1 dry_value=$2
  shift 2
  if ((DRY_RUN)); then
    emit "$@"
    OUT=$dry_value
    return 0
  fi
  local rc=0
  OUT=$("$@" 2>"$WORK/stderr") || rc=$?
  if ((rc != 0)); then
    fail "$step" "$(quote "$@") exited with $rc:" "$(tail -n 20 "$WORK/stderr")"
  fi
}

# query_secret STEP DRY_VALUE COMMAND...: like query, for a command whose output is a secret:
# OUT is added to the values redact hides before anything else can print it.
query_secret() {
  query "$@"
  SECRETS+=("$OUT")
}

# change WHAT COMMAND...: run a command that changes something (printed in a dry run).
change() {
  local what=$1
  shift
  if ((DRY_RUN)); then
    emit "$@"
    changed "$what"
    return 0
  fi
  say "running: $(quote "$@")"
  local rc=0
  "$@" >"$WORK/output" 2>&1 || rc=$?
  if ((rc != 0)); then
    fail "$what" "$(quote "$@") exited with $rc:" "$(tail -n 30 "$WORK/output")"
  fi
  changed "$what"
}

# change_stdin WHAT VALUE COMMAND...: like change, with VALUE (a secret) on the command's
# stdin, so it appears in no command line, process list or printed output.
change_stdin() {
  local what=$1 value=$2
  shift 2
  if ((DRY_RUN)); then
    emit "$@"
    changed "$what"
    return 0
  fi
  say "running: $(quote "$@") (value on stdin)"
  local rc=0
  printf '%s' "$value" | "$@" >"$WORK/output" 2>&1 || rc=$?
  if ((rc != 0)); then
    fail "$what" "$(quote "$@") exited with $rc:" "$(tail -n 30 "$WORK/output")"
  fi
  changed "$what"
}

# change_retried WHAT COMMAND...: like change, retried for a minute because a service
# account just created takes a while to be visible to IAM.
change_retried() {
  local what=$1 attempt
  shift
  if ((DRY_RUN)); then
    change "$what" "$@"
    return 0
  fi
  for attempt in 1 2 3 4 5 6; do
    if "$@" >"$WORK/output" 2>&1; then
      changed "$what"
      return 0
    fi
    ((attempt == 6)) && break
    say "retrying in 10 s: $what ($(tail -n 1 "$WORK/output"))"
    sleep 10
  done
  fail "$what" "$(quote "$@") failed 6 times:" "$(tail -n 30 "$WORK/output")"
}

csv_field() {
  local text=$1 name=$2 field=$3
  printf '%s\n' "$text" | awk -F, -v n="$name" -v f="$field" '$1 == n { print $f; exit }'
}

has_row() {
  local text=$1 name=$2
  printf '%s\n' "$text" | awk -F, -v n="$name" '$1 == n { found = 1 } END { exit !found }'
}

lower() { printf '%s' "$1" | tr '[:upper:]' '[:lower:]'; }

# ---------------------------------------------------------------------------- arguments
set_option() {
  local name=$1 value=$2
  case $name in
    --project) PROJECT=$value ;;
    --region) REGION=$value ;;
    --emulator) EMULATOR=$value ;;
    --package) PACKAGE_DIR=$value MODE=package ;;
    --transactions-topic) TRANSACTIONS_TOPIC=$value ;;
    --results-topic) RESULTS_TOPIC=$value ;;
    --dead-letter-topic) DEAD_LETTER_TOPIC=$value ;;
    --feedback-topic) FEEDBACK_TOPIC=$value ;;
    --feedback-dead-letter-topic) FEEDBACK_DEAD_LETTER_TOPIC=$value ;;
    --dead-letter-subscription) DEAD_LETTER_SUBSCRIPTION=$value ;;
    --feedback-dead-letter-subscription) FEEDBACK_DEAD_LETTER_SUBSCRIPTION=$value ;;
    --watch-subscription) WATCH_SUBSCRIPTION=$value ;;
    --push-subscription) PUSH_SUBSCRIPTION=$value ;;
    --feedback-push-subscription) FEEDBACK_PUSH_SUBSCRIPTION=$value ;;
    --push-endpoint) PUSH_ENDPOINT=${value%/} ;;
    --feedback-push-endpoint) FEEDBACK_PUSH_ENDPOINT=${value%/} ;;
    --min-retry-delay) MIN_RETRY_DELAY=$value ;;
    --max-retry-delay) MAX_RETRY_DELAY=$value ;;
    --schema-name) SCHEMA_NAME=$value ;;
    --schema-file) SCHEMA_FILE=$value ;;
    --service-account) SERVICE_ACCOUNT=$value ;;
    --runtime) RUNTIME=$value ;;
    --memory) MEMORY=$value ;;
    --cpu) CPU=$value ;;
    --concurrency) CONCURRENCY=$value ;;
    --max-instances) MAX_INSTANCES=$value ;;
    --min-instances) MIN_INSTANCES=$value ;;
    --timeout) TIMEOUT=$value ;;
    --max-delivery-attempts) MAX_DELIVERY_ATTEMPTS=$value ;;
    --redis-url)
      REDIS_URL=$value
      SECRETS+=("$value")
      ;;
    --redis-secret) REDIS_SECRET=$value ;;
    --redis-secret-name) REDIS_SECRET_NAME=$value ;;
    --create-redis) CREATE_REDIS=$value ;;
    --redis-engine) REDIS_ENGINE=$value ;;
    --network) NETWORK=$value ;;
    --subnet) SUBNET=$value ;;
    --vpc-egress) VPC_EGRESS=$value ;;
    --vpc-connector) VPC_CONNECTOR=$value ;;
    --egress-settings) EGRESS_SETTINGS=$value ;;
    --rules-file) RULES_FILE=$value ;;
    --model-path) MODEL_PATH=$value ;;
    --staging-dir) STAGING_DIR=$value ;;
    --worker-pool) WORKER_POOL=$value ;;
    --worker-subscription) WORKER_SUBSCRIPTION=$value ;;
    --worker-feedback-subscription) WORKER_FEEDBACK_SUBSCRIPTION=$value ;;
    --worker-image) WORKER_IMAGE=$value ;;
    --worker-instances) WORKER_INSTANCES=$value ;;
    *) usage_error "unknown option: $name" ;;
  esac
}

VALUE_OPTIONS="--project --region --emulator --package --transactions-topic --results-topic
  --dead-letter-topic --feedback-topic --feedback-dead-letter-topic --dead-letter-subscription
  --feedback-dead-letter-subscription --watch-subscription --push-subscription
  --feedback-push-subscription --push-endpoint --feedback-push-endpoint --min-retry-delay
  --max-retry-delay --schema-name --schema-file --service-account --runtime --memory --cpu
  --concurrency --max-instances --min-instances --timeout --max-delivery-attempts --redis-url
  --redis-secret --redis-secret-name --create-redis --redis-engine --network --subnet
  --vpc-egress --vpc-connector --egress-settings --rules-file --model-path --staging-dir
  --worker-pool --worker-subscription --worker-feedback-subscription --worker-image
  --worker-instances"
VALUE_OPTIONS=$(printf '%s' "$VALUE_OPTIONS" | tr -s ' \n' '  ')

parse_args() {
  local arg value inline
  while (($# > 0)); do
    arg=$1
    shift
    inline=0
    value=""
    if [[ $arg == --*=* ]]; then
      value=${arg#*=}
      arg=${arg%%=*}
      inline=1
    fi
    case $arg in
      -h | --help)
        usage
        exit 0
        ;;
      --dry-run | --delete | --with-schema | --allow-unauthenticated | --force | --worker | --redis-cluster | --record-all)
        ((inline)) && usage_error "$arg: takes no value, got '$value'"
        case $arg in
          --dry-run) DRY_RUN=1 ;;
          --delete) MODE=delete ;;
          --with-schema) WITH_SCHEMA=1 ;;
          --allow-unauthenticated) ALLOW_UNAUTHENTICATED=1 ;;
          --force) FORCE=1 ;;
          --worker) WORKER=1 ;;
          --redis-cluster) REDIS_CLUSTER=1 ;;
          --record-all) RECORD_ALL=1 ;;
        esac
        ;;
      --*)
        [[ " $VALUE_OPTIONS " == *" $arg "* ]] || usage_error "unknown option: $arg"
        if ((!inline)); then
          (($# > 0)) || usage_error "$arg: needs a value"
          value=$1
          shift
        fi
        set_option "$arg" "$value"
        ;;
      *) usage_error "unexpected argument: '$arg' (options start with --)" ;;
    esac
  done
}

# Pub/Sub resource ids: 3-255 characters, a letter first, not starting with "goog".
check_pubsub_name() {
  local flag=$1 name=$2 pattern='^[A-Za-z][A-Za-z0-9._~+%-]{2,254}$'
  [[ $name =~ $pattern ]] ||
    usage_error "$flag: must be 3-255 letters, digits or . _ ~ + % - starting with a letter, got '$name'"
  [[ $name != goog* ]] || usage_error "$flag: must not start with 'goog', got '$name'"
}

# Lowercase resource ids (Cloud Run, Memorystore, VPC): a letter first, no trailing '-'.
check_resource_id() {
  local flag=$1 name=$2 max=$3
  [[ $name =~ ^[a-z]([a-z0-9-]*[a-z0-9])?$ && ${#name} -le $max ]] ||
    usage_error "$flag: must be 1-$max lowercase letters, digits or -, starting with a letter, got '$name'"
}

check_whole_number() {
  local flag=$1 value=$2 min=$3 max=$4
  [[ $value =~ ^[0-9]+$ ]] || usage_error "$flag: must be a whole number, got '$value'"
  ((10#$value >= min && 10#$value <= max)) ||
    usage_error "$flag: must be between $min and $max, got $value"
}

# Whole seconds ("10s"): the form Pub/Sub reports them in, so a rerun compares exactly.
check_seconds() {
  local flag=$1 value=$2 min=$3 max=$4
  [[ $value =~ ^[0-9]+s$ ]] || usage_error "$flag: must be whole seconds like 10s, got '$value'"
  ((10#${value%s} >= min && 10#${value%s} <= max)) ||
    usage_error "$flag: must be between ${min}s and ${max}s, got $value"
}

check_no_comma() {
  local flag=$1 value=$2
  [[ $value != *,* ]] || usage_error "$flag: must not contain ',' (passed in --set-env-vars), got '$value'"
}

SPLIT_STATE="no shared state: every function instance would keep its own memory, so velocity\
 features and labels would be split between instances; pass --redis-url URL, --redis-secret\
 NAME or --create-redis NAME"

validate() {
  if [[ $MODE == package ]]; then
    [[ -n $PACKAGE_DIR ]] || usage_error "--package: needs a directory"
    return
  fi
  [[ -n $PROJECT ]] || usage_error "--project: is required (the Google Cloud project id)"
  [[ $PROJECT =~ ^[a-z][a-z0-9:.-]{4,61}[a-z0-9]$ ]] ||
    usage_error "--project: must be a project id (6-63 lowercase letters, digits, -), got '$PROJECT'"
  if [[ -n $EMULATOR ]]; then
    [[ $EMULATOR =~ ^[A-Za-z0-9_.-]+:[0-9]+$ ]] ||
      usage_error "--emulator: must be HOST:PORT, got '$EMULATOR'"
    MAX_DELIVERY_ATTEMPTS=${MAX_DELIVERY_ATTEMPTS:-5}
    MIN_RETRY_DELAY=${MIN_RETRY_DELAY:-1s}
    MAX_RETRY_DELAY=${MAX_RETRY_DELAY:-10s}
  else
    [[ -n $REGION ]] || usage_error "--region: is required (e.g. europe-west1) unless --emulator is given"
    [[ $REGION =~ ^[a-z]+-[a-z]+[0-9]+$ ]] ||
      usage_error "--region: must be a Cloud Functions region like europe-west1, got '$REGION'"
    local flag
    for flag in PUSH_ENDPOINT FEEDBACK_PUSH_ENDPOINT; do
      [[ -z ${!flag} ]] || usage_error "--$(lower "${flag//_/-}"): only with --emulator"
    done
    MAX_DELIVERY_ATTEMPTS=${MAX_DELIVERY_ATTEMPTS:-10}
    MIN_RETRY_DELAY=${MIN_RETRY_DELAY:-10s}
    MAX_RETRY_DELAY=${MAX_RETRY_DELAY:-600s}
  fi
  DEAD_LETTER_SUBSCRIPTION=${DEAD_LETTER_SUBSCRIPTION:-$DEAD_LETTER_TOPIC-keep}
  FEEDBACK_DEAD_LETTER_SUBSCRIPTION=${FEEDBACK_DEAD_LETTER_SUBSCRIPTION:-$FEEDBACK_DEAD_LETTER_TOPIC-keep}
  WATCH_SUBSCRIPTION=${WATCH_SUBSCRIPTION:-$RESULTS_TOPIC-watch}
  check_pubsub_name --transactions-topic "$TRANSACTIONS_TOPIC"
  check_pubsub_name --results-topic "$RESULTS_TOPIC"
  check_pubsub_name --dead-letter-topic "$DEAD_LETTER_TOPIC"
  check_pubsub_name --feedback-topic "$FEEDBACK_TOPIC"
  check_pubsub_name --feedback-dead-letter-topic "$FEEDBACK_DEAD_LETTER_TOPIC"
  [[ $DEAD_LETTER_TOPIC != "$FEEDBACK_DEAD_LETTER_TOPIC" ]] ||
    usage_error "--feedback-dead-letter-topic: must differ from --dead-letter-topic (a redrive sends each back to its own source), got '$DEAD_LETTER_TOPIC' for both"
  check_pubsub_name --dead-letter-subscription "$DEAD_LETTER_SUBSCRIPTION"
  check_pubsub_name --feedback-dead-letter-subscription "$FEEDBACK_DEAD_LETTER_SUBSCRIPTION"
  check_pubsub_name --watch-subscription "$WATCH_SUBSCRIPTION"
  check_pubsub_name --push-subscription "$PUSH_SUBSCRIPTION"
  check_pubsub_name --feedback-push-subscription "$FEEDBACK_PUSH_SUBSCRIPTION"
  check_pubsub_name --worker-subscription "$WORKER_SUBSCRIPTION"
  check_pubsub_name --worker-feedback-subscription "$WORKER_FEEDBACK_SUBSCRIPTION"
  check_pubsub_name --schema-name "$SCHEMA_NAME"
  check_resource_id --worker-pool "$WORKER_POOL" 49
  [[ -z $PUSH_ENDPOINT || $PUSH_ENDPOINT =~ ^https?://[^[:space:],]+$ ]] ||
    usage_error "--push-endpoint: must be an http(s) URL, got '$PUSH_ENDPOINT'"
  [[ -z $FEEDBACK_PUSH_ENDPOINT || $FEEDBACK_PUSH_ENDPOINT =~ ^https?://[^[:space:],]+$ ]] ||
    usage_error "--feedback-push-endpoint: must be an http(s) URL, got '$FEEDBACK_PUSH_ENDPOINT'"
  # Account ids are 6-30 characters; the longest suffix is "-feedback".
  [[ $SERVICE_ACCOUNT =~ ^[a-z][a-z0-9-]{4,19}[a-z0-9]$ ]] ||
    usage_error "--service-account: must be an account id prefix (6-21 lowercase letters, digits, -), got '$SERVICE_ACCOUNT'"
  check_whole_number --max-delivery-attempts "$MAX_DELIVERY_ATTEMPTS" 5 100
  check_seconds --min-retry-delay "$MIN_RETRY_DELAY" 0 600
  check_seconds --max-retry-delay "$MAX_RETRY_DELAY" "${MIN_RETRY_DELAY%s}" 600
  check_whole_number --concurrency "$CONCURRENCY" 1 1000
  check_whole_number --max-instances "$MAX_INSTANCES" 1 1000
  check_whole_number --min-instances "$MIN_INSTANCES" 0 1000
  check_whole_number --worker-instances "$WORKER_INSTANCES" 1 1000
  if ((WITH_SCHEMA)) && [[ $MODE == deploy && ! -f $SCHEMA_FILE ]]; then
    usage_error "--schema-file: no such file: $SCHEMA_FILE"
  fi
  [[ -z $RULES_FILE || -f $RULES_FILE ]] || usage_error "--rules-file: no such file: $RULES_FILE"
  [[ -z $MODEL_PATH || $MODEL_PATH == none || -f $MODEL_PATH ]] ||
    usage_error "--model-path: no such file (or 'none'): $MODEL_PATH"
  check_no_comma --rules-file "$(basename -- "${RULES_FILE:-x}")"
  check_no_comma --model-path "$(basename -- "${MODEL_PATH:-x}")"
  case $EGRESS_SETTINGS in
    private-ranges-only | all) ;;
    *) usage_error "--egress-settings: must be private-ranges-only or all, got '$EGRESS_SETTINGS'" ;;
  esac
  case $VPC_EGRESS in
    private-ranges-only | all-traffic) ;;
    *) usage_error "--vpc-egress: must be private-ranges-only or all-traffic, got '$VPC_EGRESS'" ;;
  esac
  validate_state
}

SECRET_NAME="" # the secret the functions and the worker read REDIS_URL from
SECRET_VERSION=latest

validate_state() {
  local given=0
  [[ -n $REDIS_URL ]] && given=$((given + 1))
  [[ -n $REDIS_SECRET ]] && given=$((given + 1))
  [[ -n $CREATE_REDIS ]] && given=$((given + 1))
  ((given <= 1)) || usage_error "--redis-url, --redis-secret, --create-redis: give only one"
  if [[ -n $REDIS_URL ]]; then
    [[ $REDIS_URL =~ ^rediss?://[^[:space:]]+$ ]] ||
      usage_error "--redis-url: must be a redis:// or rediss:// URL without spaces, got '$REDIS_URL'"
  fi
  [[ $REDIS_SECRET_NAME =~ ^[A-Za-z0-9_-]{1,255}$ ]] ||
    usage_error "--redis-secret-name: must be 1-255 letters, digits, - or _, got '$REDIS_SECRET_NAME'"
  SECRET_NAME=$REDIS_SECRET_NAME
  if [[ -n $REDIS_SECRET ]]; then
    SECRET_NAME=${REDIS_SECRET%%:*}
    [[ $REDIS_SECRET == *:* ]] && SECRET_VERSION=${REDIS_SECRET#*:}
    [[ $SECRET_NAME =~ ^[A-Za-z0-9_-]{1,255}$ && $SECRET_VERSION =~ ^(latest|[1-9][0-9]*)$ ]] ||
      usage_error "--redis-secret: must be NAME or NAME:VERSION (a number or latest), got '$REDIS_SECRET'"
  fi
  case $REDIS_ENGINE in
    valkey | redis) ;;
    *) usage_error "--redis-engine: must be valkey or redis, got '$REDIS_ENGINE'" ;;
  esac
  [[ -z $CREATE_REDIS ]] || check_resource_id --create-redis "$CREATE_REDIS" 40
  if [[ -n $CREATE_REDIS && -z $VPC_CONNECTOR ]]; then
    # Memorystore is reachable only from its VPC network: Direct VPC egress by default.
    NETWORK=${NETWORK:-default}
    SUBNET=${SUBNET:-default}
  fi
  if [[ -n $SUBNET && -z $NETWORK ]]; then NETWORK=default; fi
  if [[ -n $NETWORK ]]; then
    SUBNET=${SUBNET:-$NETWORK}
    check_resource_id --network "$NETWORK" 63
    check_resource_id --subnet "$SUBNET" 63
    [[ -z $VPC_CONNECTOR ]] ||
      usage_error "--vpc-connector: choose it or --network/--subnet (Direct VPC egress), not both"
  fi
  ((!WORKER)) || [[ -z $VPC_CONNECTOR ]] ||
    usage_error "--vpc-connector: a worker pool has no connector; use --network and --subnet"
  if [[ $MODE == deploy && -z $EMULATOR ]] && ((given == 0)); then
    printf '%s: error: %s\n' "$PROG" "$SPLIT_STATE" >&2
    exit 2
  fi
}

# ---------------------------------------------------------------------------- packaging
# The upload: detector/ (no tests, no caches, no detector/offline: replay, training and
# evaluation never run in a function), a root main.py re-exporting the entry points,
# requirements.txt, .gcloudignore, and the optional rules and model files under config/.
# Sets RULES_ENV and MODEL_ENV to the paths the functions see (relative to the upload root,
# which is the working directory of a deployed function).
RULES_ENV=""
MODEL_ENV=""
package_source() {
  local dir=$1
  [[ -f $ROOT/detector/main.py ]] || fail "package source" "$ROOT/detector/main.py is missing"
  [[ -f $ROOT/requirements.txt ]] || fail "package source" "$ROOT/requirements.txt is missing"
  if [[ -e $dir ]]; then
    # Only ever delete a directory this script made (or an empty one).
    if [[ -f $dir/$STAGING_MARKER ]] || [[ -d $dir && -z $(ls -A "$dir") ]]; then
      rm -rf "$dir"
    else
      fail "package source" "$dir exists and was not made by $PROG; choose another --staging-dir"
    fi
  fi
  mkdir -p "$dir"
  tar -C "$ROOT" -cf - \
    --exclude=__pycache__ --exclude='*.py[co]' --exclude=tests --exclude=.mypy_cache \
    --exclude=.pytest_cache --exclude='*.egg-info' --exclude='*.so' --exclude='*.c' \
    --exclude='*.pyi' --exclude=detector/offline detector | tar -C "$dir" -xf -
  cp "$ROOT/requirements.txt" "$dir/requirements.txt"
  cat >"$dir/main.py" <<'EOF'
"""Cloud Functions entry points of the upload (written by deploy.sh; edit detector/main.py)."""

from detector.main import detect_fraud, record_feedback, score_transaction

__all__ = ["detect_fraud", "record_feedback", "score_transaction"]
EOF
  cat >"$dir/.gcloudignore" <<EOF
# Written by deploy.sh: the directory holds only what the functions need.
.gcloudignore
$STAGING_MARKER
__pycache__/
*.py[co]
EOF
  RULES_ENV=""
  MODEL_ENV=""
  if [[ -n $RULES_FILE ]]; then
    mkdir -p "$dir/config"
    cp "$RULES_FILE" "$dir/config/"
    RULES_ENV="config/$(basename -- "$RULES_FILE")"
  fi
  if [[ $MODEL_PATH == none ]]; then
    MODEL_ENV=none
  elif [[ -n $MODEL_PATH ]]; then
    mkdir -p "$dir/config"
    cp "$MODEL_PATH" "$dir/config/"
    MODEL_ENV="config/$(basename -- "$MODEL_PATH")"
  fi
  printf 'deploy.sh staging directory; safe to delete\n' >"$dir/$STAGING_MARKER"
}

sha256() {
  if command -v sha256sum >/dev/null 2>&1; then
    sha256sum | cut -d' ' -f1
  else
    shasum -a 256 | cut -d' ' -f1
  fi
}

# Digest of the upload's contents (names and bytes), independent of timestamps.
source_digest() {
  local dir=$1
  (
    cd "$dir"
    find . -type f ! -name "$STAGING_MARKER" -print | LC_ALL=C sort | while IFS= read -r file; do
      printf '%s %s\n' "$file" "$(sha256 <"$file")"
    done
  ) | sha256
}

# ---------------------------------------------------------------------------- pubsub steps
TOPICS="" # CSV lines: name,schema,encoding
SUBSCRIPTIONS="" # CSV lines: name,topic,push endpoint,dead-letter topic,attempts,min,max

list_topics() {
  query "list topics" "" gcloud pubsub topics list --project="$PROJECT" \
    --format='csv[no-heading](name.basename(),schemaSettings.schema.basename(),schemaSettings.encoding)'
  TOPICS=$OUT
}

list_subscriptions() {
  query "list subscriptions" "" gcloud pubsub subscriptions list --project="$PROJECT" \
    --format='csv[no-heading](name.basename(),topic.basename(),pushConfig.pushEndpoint,deadLetterPolicy.deadLetterTopic.basename(),deadLetterPolicy.maxDeliveryAttempts,retryPolicy.minimumBackoff,retryPolicy.maximumBackoff)'
  SUBSCRIPTIONS=$OUT
}

ensure_schema() {
  query "list schemas" "" gcloud pubsub schemas list --project="$PROJECT" --format='value(name.basename())'
  if printf '%s\n' "$OUT" | grep -Fxq -- "$SCHEMA_NAME"; then
    unchanged "schema $SCHEMA_NAME exists (revise it with gcloud pubsub schemas commit)"
  else
    change "create schema $SCHEMA_NAME" gcloud pubsub schemas create "$SCHEMA_NAME" \
      --project="$PROJECT" --type=avro --definition-file="$SCHEMA_FILE"
  fi
}

# The five topics; the ones missing (without a schema) are created by one command.
ensure_topics() {
  local topic missing=() schema_args=(--schema="$SCHEMA_NAME" --message-encoding=json)
  for topic in "$TRANSACTIONS_TOPIC" "$RESULTS_TOPIC" "$DEAD_LETTER_TOPIC" "$FEEDBACK_TOPIC" \
    "$FEEDBACK_DEAD_LETTER_TOPIC"; do
    if ((WITH_SCHEMA)) && [[ $topic == "$TRANSACTIONS_TOPIC" ]]; then
      if ! has_row "$TOPICS" "$topic"; then
        change "create topic $topic with schema $SCHEMA_NAME" gcloud pubsub topics create "$topic" \
          --project="$PROJECT" "${schema_args[@]}"
      elif [[ $(csv_field "$TOPICS" "$topic" 2) != "$SCHEMA_NAME" ||
        $(lower "$(csv_field "$TOPICS" "$topic" 3)") != json ]]; then
        change "attach schema $SCHEMA_NAME to topic $topic" gcloud pubsub topics update "$topic" \
          --project="$PROJECT" "${schema_args[@]}"
      else
        unchanged "topic $topic exists with schema $SCHEMA_NAME"
      fi
    elif has_row "$TOPICS" "$topic"; then
      unchanged "topic $topic exists"
    else
      missing+=("$topic")
    fi
  done
  if ((${#missing[@]} > 0)); then
    change "create topics ${missing[*]}" gcloud pubsub topics create "${missing[@]}" --project="$PROJECT"
  fi
}

# The subscription's topic must be the expected one: a subscription cannot be moved.
check_subscription_topic() {
  local subscription=$1 topic=$2 actual
  actual=$(csv_field "$SUBSCRIPTIONS" "$subscription" 2)
  [[ $actual == "$topic" ]] ||
    fail "subscription $subscription" "it exists on topic '$actual', expected '$topic'" \
      "delete it or choose another name with the matching option"
}

ensure_pull_subscription() {
  local subscription=$1 topic=$2
  if has_row "$SUBSCRIPTIONS" "$subscription"; then
    check_subscription_topic "$subscription" "$topic"
    unchanged "subscription $subscription exists"
  else
    # No expiry: a subscription nobody pulls from would otherwise be deleted after 31 days.
    change "create subscription $subscription on $topic" gcloud pubsub subscriptions create \
      "$subscription" --project="$PROJECT" --topic="$topic" --expiration-period=never
  fi
}

# ensure_delivery_subscription SUBSCRIPTION TOPIC DEAD_LETTER_TOPIC [PUSH_ENDPOINT]: a
# subscription that feeds the detector, with the dead-letter and retry policy. With an
# endpoint it pushes (the emulator's stand-in for an Eventarc trigger); without, it is the
# worker's pull subscription.
ensure_delivery_subscription() {
  local subscription=$1 topic=$2 dead_letter=$3 endpoint=${4:-}
  local policy_flags=(--dead-letter-topic="$dead_letter" --max-delivery-attempts="$MAX_DELIVERY_ATTEMPTS"
    --min-retry-delay="$MIN_RETRY_DELAY" --max-retry-delay="$MAX_RETRY_DELAY")
  local kind=pull create_flags=(--ack-deadline=60 --expiration-period=never)
  if [[ -n $endpoint ]]; then
    kind=push
    create_flags=(--push-endpoint="$endpoint")
  fi
  if ! has_row "$SUBSCRIPTIONS" "$subscription"; then
    change "create $kind subscription $subscription on $topic" gcloud pubsub subscriptions create \
      "$subscription" --project="$PROJECT" --topic="$topic" "${create_flags[@]}" "${policy_flags[@]}"
    return
  fi
  check_subscription_topic "$subscription" "$topic"
  local row expected
  row=$(printf '%s\n' "$SUBSCRIPTIONS" | awk -F, -v n="$subscription" '$1 == n { print; exit }')
  expected="$subscription,$topic,$endpoint,$dead_letter,$MAX_DELIVERY_ATTEMPTS,$MIN_RETRY_DELAY,$MAX_RETRY_DELAY"
  if [[ $row == "$expected" ]]; then
    unchanged "$kind subscription $subscription exists"
  elif [[ -n $endpoint ]]; then
    change "update push subscription $subscription (endpoint, dead-letter and retry policy)" \
      gcloud pubsub subscriptions update "$subscription" --project="$PROJECT" \
      --push-endpoint="$endpoint" "${policy_flags[@]}"
  else
    change "update pull subscription $subscription (dead-letter and retry policy)" \
      gcloud pubsub subscriptions update "$subscription" --project="$PROJECT" "${policy_flags[@]}"
  fi
}

# ---------------------------------------------------------------------------- iam steps
# Bindings as CSV lines role,member, via a flattened policy.
policy_lines() {
  local step=$1
  shift
  query "$step" "" "$@" --flatten='bindings[].members' --format='csv[no-heading](bindings.role,bindings.members)'
}

has_binding() {
  local policy=$1 role=$2 member=$3
  printf '%s\n' "$policy" | grep -Fxq -- "$role,$member"
}

# ensure_bindings KIND RESOURCE ROLE MEMBER...: read the IAM policy of a topic,
# subscription or secret once and grant ROLE on it to each MEMBER that lacks it.
ensure_bindings() {
  local kind=$1 resource=$2 role=$3 member
  shift 3
  local group=(pubsub "${kind}s")
  [[ $kind == secret ]] && group=(secrets)
  policy_lines "read the IAM policy of $kind ${resource##*/}" gcloud "${group[@]}" get-iam-policy \
    "$resource" --project="$PROJECT"
  local policy=$OUT
  for member in "$@"; do
    if has_binding "$policy" "$role" "$member"; then
      unchanged "$member has $role on $kind ${resource##*/}"
    else
      change_retried "grant $role on $kind ${resource##*/} to $member" gcloud "${group[@]}" \
        add-iam-policy-binding "$resource" --project="$PROJECT" --member="$member" --role="$role"
    fi
  done
}

# ---------------------------------------------------------------------------- accounts
# One service account per workload, each allowed only what that workload does (the table is
# in docs/deploy.md): detect and feedback publish, score only reads the Redis secret, push
# is the identity the Eventarc triggers invoke the functions with, worker pulls and publishes.
account_email() { printf '%s-%s@%s.iam.gserviceaccount.com' "$SERVICE_ACCOUNT" "$1" "$PROJECT"; }
member() { printf 'serviceAccount:%s' "$(account_email "$1")"; }

# The accounts this deployment runs as; the worker replaces the two Pub/Sub functions.
ACCOUNTS=()
# The accounts that read the Redis URL secret (and connect to Redis).
STATE_ACCOUNTS=()

ensure_service_accounts() {
  query "list service accounts" "" gcloud iam service-accounts list --project="$PROJECT" --format='value(email)'
  local existing=$OUT role email
  for role in "${ACCOUNTS[@]}"; do
    email=$(account_email "$role")
    if printf '%s\n' "$existing" | grep -Fxq -- "$email"; then
      unchanged "service account $email exists"
    else
      change "create service account $email" gcloud iam service-accounts create \
        "$SERVICE_ACCOUNT-$role" --project="$PROJECT" --display-name="Fraud detector: $role" \
        --description="Identity of the fraud detector $role workload; created by deploy.sh"
    fi
  done
}

# ---------------------------------------------------------------------------- shared state
REDIS_IAM_AUTH=0
SECRET_RESOLVED="" # the version number SECRET_VERSION stands for, part of the config digest

# Percent-encode a value for a URL (RFC 3986 unreserved characters kept).
urlencode() {
  local LC_ALL=C
  local text=$1 out="" char i
  for ((i = 0; i < ${#text}; i++)); do
    char=${text:i:1}
    case $char in
      [A-Za-z0-9.~_-]) out+=$char ;;
      *)
        printf -v char '%%%02X' "'$char"
        out+=$char
        ;;
    esac
  done
  printf '%s' "$out"
}

# Memorystore for Valkey and for Redis Cluster connect through Private Service Connect,
# which needs a service connection policy for their service class in the network.
ensure_connection_policy() {
  local class=$1
  query "list service connection policies" "" gcloud network-connectivity \
    service-connection-policies list --project="$PROJECT" --region="$REGION" \
    --format='csv[no-heading](serviceClass,network.basename())'
  if printf '%s\n' "$OUT" | grep -Fxq -- "$class,$NETWORK"; then
    unchanged "network $NETWORK has a service connection policy for $class"
  else
    change "create service connection policy $class-$NETWORK" gcloud network-connectivity \
      service-connection-policies create "$class-$NETWORK" --project="$PROJECT" --region="$REGION" \
      --network="$NETWORK" --service-class="$class" \
      --subnets="projects/$PROJECT/regions/$REGION/subnetworks/$SUBNET"
  fi
}

# ensure_instance WHAT LIST_COMMAND... -- CREATE_COMMAND...: create the instance unless listed.
ensure_instance() {
  local what=$1
  shift
  local list=()
  while [[ $1 != -- ]]; do
    list+=("$1")
    shift
  done
  shift
  query "list ${what}s" "" "${list[@]}" --format='value(name.basename())'
  if printf '%s\n' "$OUT" | grep -Fxq -- "$CREATE_REDIS"; then
    unchanged "$what $CREATE_REDIS exists"
  else
    ((DRY_RUN)) || say "creating $what $CREATE_REDIS (Memorystore takes 10 to 30 minutes)"
    change "create $what $CREATE_REDIS" "$@"
  fi
}

# Create (or find) the Memorystore instance, with AUTH and in-transit TLS, and build the URL
# the detector connects with: rediss://[:AUTH@]HOST:PORT/0 plus the instance's own CA. The
# URL, the AUTH string and the CA are held in variables only, never printed.
create_redis() {
  local name=$CREATE_REDIS network_path="projects/$PROJECT/global/networks/$NETWORK"
  local host port ca auth=""
  if [[ $REDIS_ENGINE == valkey ]]; then
    local mode=cluster-disabled endpoint=CONNECTION_TYPE_PRIMARY
    if ((REDIS_CLUSTER)); then mode=cluster endpoint=CONNECTION_TYPE_DISCOVERY; fi
    ensure_connection_policy gcp-memorystore
    ensure_instance "Memorystore for Valkey instance" gcloud memorystore instances list \
      --project="$PROJECT" --location="$REGION" -- \
      gcloud memorystore instances create "$name" --project="$PROJECT" --location="$REGION" \
      --mode="$mode" --shard-count=1 --replica-count=1 --node-type=standard-small \
      --authorization-mode=iam-auth --transit-encryption-mode=server-authentication \
      --psc-auto-connections="network=$network_path,projectId=$PROJECT"
    query "read the address of $name" "$endpoint,REDIS_HOST,6379" gcloud memorystore instances \
      describe "$name" --project="$PROJECT" --location="$REGION" \
      --flatten='endpoints[].connections[]' \
      --format='csv[no-heading](endpoints.connections.pscAutoConnection.connectionType,endpoints.connections.pscAutoConnection.ipAddress,endpoints.connections.pscAutoConnection.port)'
    host=$(csv_field "$OUT" "$endpoint" 2)
    port=$(csv_field "$OUT" "$endpoint" 3)
    query "read the certificate authority of $name" REDIS_CA gcloud memorystore instances \
      get-certificate-authority "$name" --project="$PROJECT" --location="$REGION" \
      --flatten='managedServerCa.caCerts[].certificates[]' \
      --format='value(managedServerCa.caCerts.certificates)'
    ca=$OUT
    REDIS_IAM_AUTH=1
  elif ((REDIS_CLUSTER)); then
    ensure_connection_policy gcp-memorystore-redis
    ensure_instance "Memorystore for Redis Cluster" gcloud redis clusters list \
      --project="$PROJECT" --region="$REGION" -- \
      gcloud redis clusters create "$name" --project="$PROJECT" --region="$REGION" \
      --network="$network_path" --shard-count=1 --replica-count=1 \
      --node-type=redis-standard-small --auth-mode=iam-auth \
      --transit-encryption-mode=server-authentication
    query "read the address of $name" "REDIS_HOST,6379" gcloud redis clusters describe "$name" \
      --project="$PROJECT" --region="$REGION" \
      --format='csv[no-heading](discoveryEndpoints[0].address,discoveryEndpoints[0].port)'
    host=${OUT%%,*}
    port=${OUT#*,}
    query "read the certificate authority of $name" REDIS_CA gcloud redis clusters \
      get-cluster-certificate-authority "$name" --project="$PROJECT" --region="$REGION" \
      --flatten='managedServerCa.caCerts[].certificates[]' \
      --format='value(managedServerCa.caCerts.certificates)'
    ca=$OUT
    REDIS_IAM_AUTH=1
  else
    ensure_instance "Memorystore for Redis instance" gcloud redis instances list \
      --project="$PROJECT" --region="$REGION" -- \
      gcloud redis instances create "$name" --project="$PROJECT" --region="$REGION" \
      --network="$NETWORK" --tier=standard --size=1 --redis-version=redis_7_2 --enable-auth \
      --transit-encryption-mode=server-authentication
    query "read the address of $name" "REDIS_HOST,6378" gcloud redis instances describe "$name" \
      --project="$PROJECT" --region="$REGION" --format='csv[no-heading](host,port)'
    host=${OUT%%,*}
    port=${OUT#*,}
    query "read the certificate authority of $name" REDIS_CA gcloud redis instances describe \
      "$name" --project="$PROJECT" --region="$REGION" --flatten='serverCaCerts[]' \
      --format='value(serverCaCerts.cert)'
    ca=$OUT
    query_secret "read the AUTH string of $name" REDIS_AUTH gcloud redis instances \
      get-auth-string "$name" --project="$PROJECT" --region="$REGION" --format='value(authString)'
    auth=$OUT
  fi
  [[ -n $host && -n $port && -n $ca ]] ||
    fail "read the address of $name" "$name has no address, port or certificate authority yet" \
      "wait until it is ready (gcloud shows its state) and run again"
  # The certificate chain is verified against this instance's own CA; Memorystore serves a
  # certificate for its IP address, which is why the host name is not checked.
  REDIS_URL="rediss://${auth:+:$(urlencode "$auth")@}$host:$port/0?ssl_cert_reqs=required"
  REDIS_URL+="&ssl_check_hostname=false&ssl_ca_data=$(urlencode "$ca")"
  SECRETS+=("$REDIS_URL")
}

# Write REDIS_URL to the secret, on stdin, only if the secret's latest version differs.
store_redis_url() {
  query "list secrets" "" gcloud secrets list --project="$PROJECT" --format='value(name.basename())'
  if ! printf '%s\n' "$OUT" | grep -Fxq -- "$SECRET_NAME"; then
    change_stdin "create secret $SECRET_NAME holding the Redis URL" "$REDIS_URL" gcloud secrets \
      create "$SECRET_NAME" --project="$PROJECT" --replication-policy=automatic \
      --labels=managed_by=deploy_sh --data-file=-
    return
  fi
  local current=""
  if ((DRY_RUN)); then
    emit gcloud secrets versions access latest --secret="$SECRET_NAME" --project="$PROJECT"
  else
    # A secret without an enabled version reads as empty, and gets one.
    current=$(gcloud secrets versions access latest --secret="$SECRET_NAME" --project="$PROJECT" 2>/dev/null) || current=""
    SECRETS+=("$current")
  fi
  if [[ -n $current && $current == "$REDIS_URL" ]]; then
    unchanged "secret $SECRET_NAME holds this Redis URL"
  else
    change_stdin "add a version to secret $SECRET_NAME (the Redis URL changed)" "$REDIS_URL" \
      gcloud secrets versions add "$SECRET_NAME" --project="$PROJECT" --data-file=-
  fi
}

ensure_shared_state() {
  if [[ -n $CREATE_REDIS ]]; then
    create_redis
  fi
  if [[ -n $REDIS_URL ]]; then
    store_redis_url
  fi
  query "read secret $SECRET_NAME" "SECRET_VERSION,ENABLED" gcloud secrets versions describe \
    "$SECRET_VERSION" --secret="$SECRET_NAME" --project="$PROJECT" \
    --format='csv[no-heading](name.basename(),state)'
  [[ $OUT == *,ENABLED ]] ||
    fail "read secret $SECRET_NAME" "version $SECRET_VERSION is not enabled (state: ${OUT#*,})"
  SECRET_RESOLVED=${OUT%%,*}
  local role members=() account
  for account in "${STATE_ACCOUNTS[@]}"; do
    members+=("$(member "$account")")
  done
  ensure_bindings secret "$SECRET_NAME" roles/secretmanager.secretAccessor "${members[@]}"
  if ((REDIS_IAM_AUTH)); then
    # Memorystore IAM authentication is granted per project: its roles have no
    # instance-level binding in gcloud.
    role=roles/memorystore.dbConnectionUser
    [[ $REDIS_ENGINE == redis ]] && role=roles/redis.dbConnectionUser
    policy_lines "read the IAM policy of project $PROJECT" gcloud projects get-iam-policy "$PROJECT"
    local policy=$OUT item
    for item in "${members[@]}"; do
      if has_binding "$policy" "$role" "$item"; then
        unchanged "$item has $role on project $PROJECT"
      else
        change_retried "grant $role on project $PROJECT to $item" gcloud projects \
          add-iam-policy-binding "$PROJECT" --member="$item" --role="$role" --condition=None
      fi
    done
  fi
}

# ---------------------------------------------------------------------------- functions
FUNCTIONS="" # CSV lines: name,digest label
PUBSUB_AGENT=""

# env_vars WORKLOAD: the plain environment of detect, feedback, score or worker. REDIS_URL
# is not among them: it comes from Secret Manager (--set-secrets).
env_vars() {
  local workload=$1 vars
  vars="GOOGLE_CLOUD_PROJECT=$PROJECT,RESULTS_TOPIC=$RESULTS_TOPIC,DEAD_LETTER_TOPIC=$DEAD_LETTER_TOPIC"
  vars+=",MAX_DELIVERY_ATTEMPTS=$MAX_DELIVERY_ATTEMPTS"
  [[ $workload == feedback ]] && vars+=",FEEDBACK_TOPIC=$FEEDBACK_TOPIC"
  [[ $workload == feedback || $workload == worker ]] &&
    vars+=",FEEDBACK_DEAD_LETTER_TOPIC=$FEEDBACK_DEAD_LETTER_TOPIC"
  [[ -n $RULES_ENV ]] && vars+=",RULES_FILE=$RULES_ENV"
  [[ -n $MODEL_ENV ]] && vars+=",MODEL_PATH=$MODEL_ENV"
  ((REDIS_IAM_AUTH)) && vars+=",REDIS_IAM_AUTH=true"
  ((RECORD_ALL)) && vars+=",STATE_RECORD=all"
  printf '%s' "$vars"
}

# config_digest SOURCE_DIGEST ARGS...: what a deployment is made of, as a label value. The
# upload's location is not part of it (its contents are): a clone elsewhere is the same. The
# secret's resolved version is: a new Redis URL restarts the instances on it.
config_digest() {
  local digest=$1
  shift
  (printf '%s\n' "$digest" "$SECRET_RESOLVED" "${@/#--source=*/--source}") | sha256 | cut -c1-32
}

# deploy_function NAME ENTRY_POINT ACCOUNT SOURCE_DIGEST TRIGGER_ARGS...
deploy_function() {
  local name=$1 entry_point=$2 account=$3 digest=$4
  shift 4
  local args=(gcloud functions deploy "$name" --gen2 --project="$PROJECT" --region="$REGION"
    --runtime="$RUNTIME" --source="$STAGING_DIR" --entry-point="$entry_point" "$@"
    --run-service-account="$(account_email "$account")" --memory="$MEMORY" --cpu="$CPU"
    --concurrency="$CONCURRENCY" --max-instances="$MAX_INSTANCES" --min-instances="$MIN_INSTANCES"
    --timeout="$TIMEOUT" --set-env-vars="$(env_vars "$account")"
    --set-secrets="REDIS_URL=$SECRET_NAME:$SECRET_VERSION")
  if [[ -n $VPC_CONNECTOR ]]; then
    args+=(--vpc-connector="$VPC_CONNECTOR" --egress-settings="$EGRESS_SETTINGS")
  fi
  # The label records what was deployed: same source and same flags means nothing to do.
  local config
  config=$(config_digest "$digest" "${args[@]}")
  args+=(--update-labels="$DIGEST_LABEL=$config" --quiet)
  local current
  current=$(csv_field "$FUNCTIONS" "$name" 2)
  if ((!FORCE)) && has_row "$FUNCTIONS" "$name" && [[ $current == "$config" ]]; then
    unchanged "function $name is deployed with this source and these settings"
  else
    ((DRY_RUN)) || say "deploying function $name (Cloud Build takes a few minutes)"
    change "deploy function $name" "${args[@]}"
  fi
  if [[ -n $NETWORK ]]; then
    ensure_direct_vpc "$name"
  fi
}

# gcloud functions deploy has no Direct VPC egress flags (SDK 528), so it is set on the
# function's Cloud Run service, and checked on every run: a redeploy that drops it is repaired.
ensure_direct_vpc() {
  local name=$1
  query "read the network of $name" "" gcloud run services describe "$name" --project="$PROJECT" \
    --region="$REGION" --format='value(spec.template.metadata.annotations)'
  if [[ $OUT == *"run.googleapis.com/vpc-access-egress=$VPC_EGRESS"* &&
    $OUT == *"\"network\":\"$NETWORK\""* && $OUT == *"\"subnetwork\":\"$SUBNET\""* ]]; then
    unchanged "$name sends $VPC_EGRESS through network $NETWORK, subnet $SUBNET"
  else
    change "route $name through network $NETWORK, subnet $SUBNET (Direct VPC egress)" gcloud run \
      services update "$name" --project="$PROJECT" --region="$REGION" --network="$NETWORK" \
      --subnet="$SUBNET" --vpc-egress="$VPC_EGRESS" --quiet
  fi
}

# configure_trigger NAME DEAD_LETTER_TOPIC: the Eventarc trigger's subscription gets the
# dead-letter and retry policy; the Pub/Sub service agent must be able to read from it (to
# forward) and publish to the dead-letter topic; the push account may invoke the function.
configure_trigger() {
  local name=$1 dead_letter=$2 placeholder
  placeholder=$(printf '%s' "$name" | tr '[:lower:]-' '[:upper:]_')
  query "find the trigger of $name" "${placeholder}_TRIGGER" gcloud functions describe "$name" \
    --v2 --project="$PROJECT" --region="$REGION" --format='value(eventTrigger.trigger)'
  local trigger=$OUT
  [[ -n $trigger ]] || fail "find the trigger of $name" "function $name has no event trigger"
  query "find the subscription of $name" "${placeholder}_SUBSCRIPTION" gcloud eventarc triggers \
    describe "$trigger" --project="$PROJECT" --location="$REGION" \
    --format='value(transport.pubsub.subscription)'
  local subscription=$OUT
  [[ -n $subscription ]] || fail "find the subscription of $name" "trigger $trigger has no Pub/Sub subscription"
  local short=${subscription##*/}
  query "read the subscription of $name" "" gcloud pubsub subscriptions describe "$subscription" \
    --project="$PROJECT" \
    --format='csv[no-heading](deadLetterPolicy.deadLetterTopic.basename(),deadLetterPolicy.maxDeliveryAttempts,retryPolicy.minimumBackoff,retryPolicy.maximumBackoff)'
  if [[ $OUT == "$dead_letter,$MAX_DELIVERY_ATTEMPTS,$MIN_RETRY_DELAY,$MAX_RETRY_DELAY" ]]; then
    unchanged "subscription $short of $name dead-letters to $dead_letter with this retry policy"
  else
    change "set dead-letter and retry policy on subscription $short of $name" gcloud pubsub \
      subscriptions update "$subscription" --project="$PROJECT" --dead-letter-topic="$dead_letter" \
      --max-delivery-attempts="$MAX_DELIVERY_ATTEMPTS" --min-retry-delay="$MIN_RETRY_DELAY" \
      --max-retry-delay="$MAX_RETRY_DELAY"
  fi
  ensure_bindings subscription "$subscription" roles/pubsub.subscriber "$PUBSUB_AGENT"
  # Eventarc pushes to the function as the push account, the only one that may invoke it.
  local invoker
  invoker=$(member push)
  policy_lines "read the IAM policy of function $name" gcloud run services get-iam-policy "$name" \
    --project="$PROJECT" --region="$REGION"
  if has_binding "$OUT" roles/run.invoker "$invoker"; then
    unchanged "$invoker may invoke $name"
  else
    change_retried "grant roles/run.invoker on $name to $invoker" gcloud functions \
      add-invoker-policy-binding "$name" --project="$PROJECT" --region="$REGION" --member="$invoker"
  fi
}

# ---------------------------------------------------------------------------- worker
WORKER_STAGING_DIR=""

# The worker's build context: the repository's Dockerfile and .dockerignore, requirements.txt
# and the same detector/ files as the function upload.
stage_worker_source() {
  local dir=$1
  package_source "$dir"
  rm -f "$dir/main.py" "$dir/.gcloudignore"
  rm -rf "$dir/config"
  cp "$ROOT/Dockerfile" "$ROOT/.dockerignore" "$dir/"
}

deploy_worker() {
  local functions_here=() name
  for name in "$DETECT_FUNCTION" "$FEEDBACK_FUNCTION"; do
    if has_row "$FUNCTIONS" "$name"; then functions_here+=("$name"); fi
  done
  ((${#functions_here[@]} == 0)) ||
    fail "worker" "functions ${functions_here[*]} are deployed: with the worker, each transaction would be decided twice" \
      "remove them first: gcloud functions delete NAME --project=$PROJECT --region=$REGION"

  section "worker subscriptions"
  ensure_delivery_subscription "$WORKER_SUBSCRIPTION" "$TRANSACTIONS_TOPIC" "$DEAD_LETTER_TOPIC"
  ensure_delivery_subscription "$WORKER_FEEDBACK_SUBSCRIPTION" "$FEEDBACK_TOPIC" \
    "$FEEDBACK_DEAD_LETTER_TOPIC"
  ensure_bindings subscription "$WORKER_SUBSCRIPTION" roles/pubsub.subscriber "$(member worker)" \
    "$PUBSUB_AGENT"
  ensure_bindings subscription "$WORKER_FEEDBACK_SUBSCRIPTION" roles/pubsub.subscriber \
    "$(member worker)" "$PUBSUB_AGENT"

  section "worker pool"
  local source_args=(--image="$WORKER_IMAGE") digest=image
  if [[ -z $WORKER_IMAGE ]]; then
    stage_worker_source "$WORKER_STAGING_DIR"
    digest=$(source_digest "$WORKER_STAGING_DIR")
    source_args=(--source="$WORKER_STAGING_DIR")
  fi
  query "list worker pools" "" gcloud beta run worker-pools list --project="$PROJECT" \
    --region="$REGION" --format="csv[no-heading](metadata.name,metadata.labels.$DIGEST_LABEL)"
  local pools=$OUT
  local args=(gcloud beta run worker-pools deploy "$WORKER_POOL" --project="$PROJECT"
    --region="$REGION" "${source_args[@]}" --service-account="$(account_email worker)"
    --cpu="$CPU" --memory="$MEMORY" --scaling="$WORKER_INSTANCES"
    --args="--subscription,$WORKER_SUBSCRIPTION,--feedback-subscription,$WORKER_FEEDBACK_SUBSCRIPTION"
    --set-env-vars="$(env_vars worker)" --set-secrets="REDIS_URL=$SECRET_NAME:$SECRET_VERSION")
  if [[ -n $NETWORK ]]; then
    args+=(--network="$NETWORK" --subnet="$SUBNET" --vpc-egress="$VPC_EGRESS")
  fi
  local config
  config=$(config_digest "$digest" "${args[@]}")
  args+=(--update-labels="$DIGEST_LABEL=$config" --quiet)
  if ((!FORCE)) && has_row "$pools" "$WORKER_POOL" &&
    [[ $(csv_field "$pools" "$WORKER_POOL" 2) == "$config" ]]; then
    unchanged "worker pool $WORKER_POOL is deployed with this source and these settings"
  else
    ((DRY_RUN)) || say "deploying worker pool $WORKER_POOL (Cloud Build takes a few minutes)"
    change "deploy worker pool $WORKER_POOL" "${args[@]}"
  fi
}

# ---------------------------------------------------------------------------- modes
deploy_cloud() {
  if ((WORKER)); then
    ACCOUNTS=(score worker)
    STATE_ACCOUNTS=(score worker)
  else
    ACCOUNTS=(detect feedback score push)
    STATE_ACCOUNTS=(detect feedback score)
  fi
  WORKER_STAGING_DIR="$(dirname -- "$STAGING_DIR")/worker-source"

  section "stage the function source in $STAGING_DIR (done locally, also in a dry run)"
  package_source "$STAGING_DIR"
  local digest
  digest=$(source_digest "$STAGING_DIR")
  ((DRY_RUN)) || say "staged the function source in $STAGING_DIR"

  section "enable APIs"
  local apis=("${REQUIRED_APIS[@]}")
  [[ -n $NETWORK ]] && apis+=(compute.googleapis.com)
  if [[ -n $CREATE_REDIS ]]; then
    if [[ $REDIS_ENGINE == valkey ]]; then
      apis+=(memorystore.googleapis.com networkconnectivity.googleapis.com)
    else
      apis+=(redis.googleapis.com)
      ((REDIS_CLUSTER)) && apis+=(networkconnectivity.googleapis.com)
    fi
  fi
  query "list enabled APIs" "" gcloud services list --enabled --project="$PROJECT" --format='value(config.name)'
  local api missing=()
  for api in "${apis[@]}"; do
    printf '%s\n' "$OUT" | grep -Fxq -- "$api" || missing+=("$api")
  done
  if ((${#missing[@]} > 0)); then
    change "enable ${missing[*]}" gcloud services enable "${missing[@]}" --project="$PROJECT"
  else
    unchanged "APIs enabled"
  fi

  section "find the Pub/Sub service agent"
  query "read the project number" PROJECT_NUMBER gcloud projects describe "$PROJECT" \
    --format='value(projectNumber)'
  [[ -n $OUT ]] || fail "read the project number" "gcloud returned no project number for $PROJECT"
  PUBSUB_AGENT="serviceAccount:service-$OUT@gcp-sa-pubsub.iam.gserviceaccount.com"

  if ((WITH_SCHEMA)); then
    section "schema"
    ensure_schema
  fi

  section "topics"
  list_topics
  ensure_topics

  section "dead-letter subscriptions"
  list_subscriptions
  ensure_pull_subscription "$DEAD_LETTER_SUBSCRIPTION" "$DEAD_LETTER_TOPIC"
  ensure_pull_subscription "$FEEDBACK_DEAD_LETTER_SUBSCRIPTION" "$FEEDBACK_DEAD_LETTER_TOPIC"

  section "service accounts"
  ensure_service_accounts

  section "shared state"
  ensure_shared_state

  section "publish permissions"
  # Topic-level grants: each account may publish where its workload publishes, no more.
  if ((WORKER)); then
    ensure_bindings topic "$RESULTS_TOPIC" roles/pubsub.publisher "$(member worker)"
    ensure_bindings topic "$DEAD_LETTER_TOPIC" roles/pubsub.publisher "$(member worker)" "$PUBSUB_AGENT"
    ensure_bindings topic "$FEEDBACK_DEAD_LETTER_TOPIC" roles/pubsub.publisher "$(member worker)" \
      "$PUBSUB_AGENT"
  else
    ensure_bindings topic "$RESULTS_TOPIC" roles/pubsub.publisher "$(member detect)"
    ensure_bindings topic "$DEAD_LETTER_TOPIC" roles/pubsub.publisher "$(member detect)" "$PUBSUB_AGENT"
    ensure_bindings topic "$FEEDBACK_DEAD_LETTER_TOPIC" roles/pubsub.publisher "$(member feedback)" \
      "$PUBSUB_AGENT"
    # Pub/Sub signs the push requests of the triggers as the push account (needed on projects
    # whose Pub/Sub service agent predates April 2021; harmless elsewhere).
    local push_email
    push_email=$(account_email push)
    policy_lines "read the IAM policy of service account $push_email" gcloud iam service-accounts \
      get-iam-policy "$push_email" --project="$PROJECT"
    if has_binding "$OUT" roles/iam.serviceAccountTokenCreator "$PUBSUB_AGENT"; then
      unchanged "$PUBSUB_AGENT has roles/iam.serviceAccountTokenCreator on $push_email"
    else
      change_retried "grant roles/iam.serviceAccountTokenCreator on $push_email to $PUBSUB_AGENT" \
        gcloud iam service-accounts add-iam-policy-binding "$push_email" --project="$PROJECT" \
        --member="$PUBSUB_AGENT" --role=roles/iam.serviceAccountTokenCreator
    fi
  fi

  section "functions"
  query "list functions" "" gcloud functions list --v2 --project="$PROJECT" --regions="$REGION" \
    --format="csv[no-heading](name.basename(),labels.$DIGEST_LABEL)"
  FUNCTIONS=$OUT
  if ((!WORKER)); then
    deploy_function "$DETECT_FUNCTION" detect_fraud detect "$digest" \
      --trigger-topic="$TRANSACTIONS_TOPIC" --retry --trigger-service-account="$(account_email push)"
    deploy_function "$FEEDBACK_FUNCTION" record_feedback feedback "$digest" \
      --trigger-topic="$FEEDBACK_TOPIC" --retry --trigger-service-account="$(account_email push)"
  fi
  local access=--no-allow-unauthenticated
  ((ALLOW_UNAUTHENTICATED)) && access=--allow-unauthenticated
  deploy_function "$SCORE_FUNCTION" score_transaction score "$digest" --trigger-http "$access"

  if ((WORKER)); then
    deploy_worker
  else
    section "dead-letter and retry policies of the triggers"
    configure_trigger "$DETECT_FUNCTION" "$DEAD_LETTER_TOPIC"
    configure_trigger "$FEEDBACK_FUNCTION" "$FEEDBACK_DEAD_LETTER_TOPIC"
  fi
}

provision_emulator() {
  if ((WITH_SCHEMA)); then
    section "schema"
    ensure_schema
  fi
  section "topics"
  list_topics
  ensure_topics
  section "subscriptions"
  list_subscriptions
  ensure_pull_subscription "$DEAD_LETTER_SUBSCRIPTION" "$DEAD_LETTER_TOPIC"
  ensure_pull_subscription "$FEEDBACK_DEAD_LETTER_SUBSCRIPTION" "$FEEDBACK_DEAD_LETTER_TOPIC"
  ensure_pull_subscription "$WATCH_SUBSCRIPTION" "$RESULTS_TOPIC"
  if [[ -n $PUSH_ENDPOINT ]]; then
    ensure_delivery_subscription "$PUSH_SUBSCRIPTION" "$TRANSACTIONS_TOPIC" "$DEAD_LETTER_TOPIC" \
      "$PUSH_ENDPOINT/projects/$PROJECT/topics/$TRANSACTIONS_TOPIC"
  fi
  if [[ -n $FEEDBACK_PUSH_ENDPOINT ]]; then
    ensure_delivery_subscription "$FEEDBACK_PUSH_SUBSCRIPTION" "$FEEDBACK_TOPIC" \
      "$FEEDBACK_DEAD_LETTER_TOPIC" "$FEEDBACK_PUSH_ENDPOINT/projects/$PROJECT/topics/$FEEDBACK_TOPIC"
  fi
  if ((WORKER)); then
    ensure_delivery_subscription "$WORKER_SUBSCRIPTION" "$TRANSACTIONS_TOPIC" "$DEAD_LETTER_TOPIC"
    ensure_delivery_subscription "$WORKER_FEEDBACK_SUBSCRIPTION" "$FEEDBACK_TOPIC" \
      "$FEEDBACK_DEAD_LETTER_TOPIC"
  fi
}

# delete_present WHAT EXISTING NAME...: one delete command for the names that exist (in a
# dry run, all of them). WHAT is "subscriptions" or "topics".
delete_present() {
  local what=$1 existing=$2 name present=()
  shift 2
  for name in "$@"; do
    if ((DRY_RUN)) || has_row "$existing" "$name"; then
      present+=("$name")
    else
      unchanged "${what%s} $name is absent"
    fi
  done
  if ((${#present[@]} > 0)); then
    change "delete $what ${present[*]}" gcloud pubsub "$what" delete "${present[@]}" \
      --project="$PROJECT" --quiet
  fi
}

delete_all() {
  local name
  if [[ -z $EMULATOR ]]; then
    section "functions"
    query "list functions" "" gcloud functions list --v2 --project="$PROJECT" --regions="$REGION" \
      --format="csv[no-heading](name.basename(),labels.$DIGEST_LABEL)"
    FUNCTIONS=$OUT
    for name in "$DETECT_FUNCTION" "$FEEDBACK_FUNCTION" "$SCORE_FUNCTION"; do
      if has_row "$FUNCTIONS" "$name" || ((DRY_RUN)); then
        change "delete function $name (with its trigger and subscription)" gcloud functions delete \
          "$name" --project="$PROJECT" --region="$REGION" --quiet
      else
        unchanged "function $name is absent"
      fi
    done

    section "worker pool"
    query "list worker pools" "" gcloud beta run worker-pools list --project="$PROJECT" \
      --region="$REGION" --format="csv[no-heading](metadata.name,metadata.labels.$DIGEST_LABEL)"
    if has_row "$OUT" "$WORKER_POOL" || ((DRY_RUN)); then
      change "delete worker pool $WORKER_POOL" gcloud beta run worker-pools delete "$WORKER_POOL" \
        --project="$PROJECT" --region="$REGION" --quiet
    else
      unchanged "worker pool $WORKER_POOL is absent"
    fi
  fi

  section "subscriptions"
  list_subscriptions
  local subscriptions=("$DEAD_LETTER_SUBSCRIPTION" "$FEEDBACK_DEAD_LETTER_SUBSCRIPTION"
    "$WORKER_SUBSCRIPTION" "$WORKER_FEEDBACK_SUBSCRIPTION")
  if [[ -n $EMULATOR ]]; then
    subscriptions+=("$WATCH_SUBSCRIPTION" "$PUSH_SUBSCRIPTION" "$FEEDBACK_PUSH_SUBSCRIPTION")
  fi
  delete_present subscriptions "$SUBSCRIPTIONS" "${subscriptions[@]}"

  section "topics"
  list_topics
  delete_present topics "$TOPICS" "$TRANSACTIONS_TOPIC" "$RESULTS_TOPIC" "$DEAD_LETTER_TOPIC" \
    "$FEEDBACK_TOPIC" "$FEEDBACK_DEAD_LETTER_TOPIC"

  section "schema"
  query "list schemas" "" gcloud pubsub schemas list --project="$PROJECT" --format='value(name.basename())'
  if printf '%s\n' "$OUT" | grep -Fxq -- "$SCHEMA_NAME" || ((DRY_RUN)); then
    change "delete schema $SCHEMA_NAME" gcloud pubsub schemas delete "$SCHEMA_NAME" \
      --project="$PROJECT" --quiet
  else
    unchanged "schema $SCHEMA_NAME is absent"
  fi

  if [[ -z $EMULATOR ]]; then
    section "service accounts"
    query "list service accounts" "" gcloud iam service-accounts list --project="$PROJECT" --format='value(email)'
    local existing=$OUT role email
    for role in detect feedback score push worker; do
      email=$(account_email "$role")
      if printf '%s\n' "$existing" | grep -Fxq -- "$email" || ((DRY_RUN)); then
        change "delete service account $email" gcloud iam service-accounts delete "$email" \
          --project="$PROJECT" --quiet
      else
        unchanged "service account $email is absent"
      fi
    done

    # Only the secret deploy.sh wrote (labelled so); a Memorystore instance keeps its data
    # and is left alone (docs/deploy.md has the command that removes it).
    section "Redis URL secret"
    query "list secrets" "" gcloud secrets list --project="$PROJECT" \
      --format='csv[no-heading](name.basename(),labels.managed_by)'
    if [[ $(csv_field "$OUT" "$REDIS_SECRET_NAME" 2) == deploy_sh ]] || ((DRY_RUN)); then
      change "delete secret $REDIS_SECRET_NAME" gcloud secrets delete "$REDIS_SECRET_NAME" \
        --project="$PROJECT" --quiet
    else
      unchanged "secret $REDIS_SECRET_NAME is absent or not written by $PROG"
    fi
  fi
}

summary() {
  if ((DRY_RUN)); then
    say "dry run: printed $PRINTED_COUNT commands, ran none"
    return
  fi
  say "summary: did $CHANGED_COUNT, skipped $UNCHANGED_COUNT"
}

main() {
  parse_args "$@"
  validate
  if [[ $MODE == package ]]; then
    package_source "$PACKAGE_DIR"
    printf '%s\n' "$PACKAGE_DIR"
    return
  fi
  if ((WORKER)) && [[ -z $EMULATOR && $MODE == deploy ]]; then
    [[ -z $RULES_FILE && ($MODEL_PATH == "" || $MODEL_PATH == none) ]] ||
      usage_error "--rules-file, --model-path FILE: not with --worker (the image carries the bundled ones; build your own image and pass --worker-image)"
    [[ -n $WORKER_IMAGE || (-f $ROOT/Dockerfile && -f $ROOT/.dockerignore) ]] ||
      usage_error "--worker: $ROOT/Dockerfile and .dockerignore are needed to build the image"
  fi
  if ((!DRY_RUN)) && ! command -v gcloud >/dev/null 2>&1; then
    fail "find gcloud" "gcloud is not on PATH; install the Google Cloud SDK: https://cloud.google.com/sdk/docs/install"
  fi
  WORK=$(mktemp -d)
  # gcloud must never wait for an answer: every command here is complete.
  export CLOUDSDK_CORE_DISABLE_PROMPTS=1
  if [[ -n $EMULATOR ]]; then
    export CLOUDSDK_API_ENDPOINT_OVERRIDES_PUBSUB="http://$EMULATOR/"
    export CLOUDSDK_AUTH_DISABLE_CREDENTIALS=true
    if ((DRY_RUN)); then
      emit export "CLOUDSDK_API_ENDPOINT_OVERRIDES_PUBSUB=$CLOUDSDK_API_ENDPOINT_OVERRIDES_PUBSUB"
      emit export CLOUDSDK_AUTH_DISABLE_CREDENTIALS=true
    fi
  fi
  if [[ $MODE == delete ]]; then
    delete_all
  elif [[ -n $EMULATOR ]]; then
    provision_emulator
  else
    deploy_cloud
  fi
  summary
}

main "$@"
