#!/usr/bin/env bash
# deploy.sh: provision Pub/Sub and deploy the fraud detector's Cloud Functions (2nd gen).
#
# Every step checks before it changes anything, so running it again only does what is
# missing or different and says what it skipped. --dry-run prints every gcloud command
# (the read-only checks too) and runs none. --emulator provisions the same topics and
# subscriptions on a local Pub/Sub emulator. --package DIR only assembles the upload.
# Run ./deploy.sh --help for the options; docs/deploy.md explains what gets created.

set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PROG=deploy.sh

# Google APIs a deployment uses; iam creates the service account.
REQUIRED_APIS=(
  cloudfunctions.googleapis.com
  run.googleapis.com
  cloudbuild.googleapis.com
  eventarc.googleapis.com
  pubsub.googleapis.com
  artifactregistry.googleapis.com
  iam.googleapis.com
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
DEAD_LETTER_SUBSCRIPTION="" # default: <dead-letter topic>-keep
WATCH_SUBSCRIPTION=""       # default: <results topic>-watch (emulator only)
PUSH_ENDPOINT=""
FEEDBACK_PUSH_ENDPOINT=""
PUSH_SUBSCRIPTION=detect-fraud-push
FEEDBACK_PUSH_SUBSCRIPTION=record-feedback-push
WITH_SCHEMA=0
SCHEMA_NAME=transaction-schema
SCHEMA_FILE="$ROOT/schemas/transaction.avsc"
SERVICE_ACCOUNT=fraud-detector
RUNTIME=python311
MEMORY=512Mi
CPU=1
CONCURRENCY=8
MAX_INSTANCES=10
MIN_INSTANCES=0
TIMEOUT=60s
MAX_DELIVERY_ATTEMPTS=5
MIN_RETRY_DELAY=1s
MAX_RETRY_DELAY=10s
ALLOW_UNAUTHENTICATED=0
REDIS_URL=""
VPC_CONNECTOR=""
EGRESS_SETTINGS=private-ranges-only
RULES_FILE=""
MODEL_PATH=""
STAGING_DIR="$ROOT/build/function-source"
PACKAGE_DIR=""
FORCE=0

usage() {
  cat <<EOF
Usage:
  ./deploy.sh --project P --region R [options]        deploy to Google Cloud
  ./deploy.sh --project P --region R --delete         remove what deploy created
  ./deploy.sh --emulator HOST:PORT --project P [...]  provision a Pub/Sub emulator
  ./deploy.sh --package DIR                           only assemble the upload in DIR

Modes:
  --dry-run                 print every gcloud command (checks included), run none
  --delete                  delete functions, subscriptions, topics, schema, service account
  --emulator HOST:PORT      topics and subscriptions on the Pub/Sub emulator, no functions
  --package DIR             write the function source upload to DIR and exit

Names (all overridable so tests can use fresh ones):
  --transactions-topic NAME       [$TRANSACTIONS_TOPIC]
  --results-topic NAME            [$RESULTS_TOPIC]
  --dead-letter-topic NAME        [$DEAD_LETTER_TOPIC]
  --feedback-topic NAME           [$FEEDBACK_TOPIC]
  --dead-letter-subscription NAME [<dead-letter topic>-keep]
  --watch-subscription NAME       [<results topic>-watch] (emulator only)
  --push-subscription NAME        [$PUSH_SUBSCRIPTION] (emulator only)
  --feedback-push-subscription NAME [$FEEDBACK_PUSH_SUBSCRIPTION] (emulator only)
  --service-account NAME          [$SERVICE_ACCOUNT] account id of the functions' identity

Emulator:
  --push-endpoint URL             push transactions to URL/projects/P/topics/<topic>
  --feedback-push-endpoint URL    push feedback to URL/projects/P/topics/<feedback topic>
  --min-retry-delay D, --max-retry-delay D   push retry backoff [$MIN_RETRY_DELAY, $MAX_RETRY_DELAY]

Schema:
  --with-schema             attach the Avro schema to the transactions topic (JSON encoding)
  --schema-name NAME        [$SCHEMA_NAME]
  --schema-file FILE        [schemas/transaction.avsc]

Functions:
  --runtime R [$RUNTIME]  --memory M [$MEMORY]  --cpu C [$CPU]  --concurrency N [$CONCURRENCY]
  --max-instances N [$MAX_INSTANCES]  --min-instances N [$MIN_INSTANCES]  --timeout D [$TIMEOUT]
  --max-delivery-attempts N [$MAX_DELIVERY_ATTEMPTS] before a message goes to the dead-letter topic
  --allow-unauthenticated   make $SCORE_FUNCTION public (default: IAM-authenticated callers only)
  --redis-url URL           keep detector state in Redis (REDIS_URL)
  --vpc-connector NAME      Serverless VPC Access connector to reach Redis
  --egress-settings S       [$EGRESS_SETTINGS] with --vpc-connector
  --rules-file FILE         ruleset to upload (RULES_FILE); default: the bundled one
  --model-path FILE|none    model to upload (MODEL_PATH); default: the bundled one
  --staging-dir DIR         where the upload is assembled [build/function-source]
  --force                   redeploy functions even when source and settings are unchanged
EOF
}

# ---------------------------------------------------------------------------- output
say() { printf '%s: %s\n' "$PROG" "$*" >&2; }

usage_error() {
  printf '%s: error: %s\n' "$PROG" "$*" >&2
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
  printf '%s: error: step "%s" failed: %s\n' "$PROG" "$step" "$1" >&2
  shift
  local line
  for line in "$@"; do
    if [[ -n $line ]]; then
      printf '%s\n' "$line" | sed 's/^/    /' >&2
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
  printf '%s\n' "$(quote "$@")"
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

# Field N (1-based) of the CSV line of OUT-style text whose first field is NAME.
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
    --dead-letter-subscription) DEAD_LETTER_SUBSCRIPTION=$value ;;
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
    --redis-url) REDIS_URL=$value ;;
    --vpc-connector) VPC_CONNECTOR=$value ;;
    --egress-settings) EGRESS_SETTINGS=$value ;;
    --rules-file) RULES_FILE=$value ;;
    --model-path) MODEL_PATH=$value ;;
    --staging-dir) STAGING_DIR=$value ;;
    *) usage_error "unknown option: $name" ;;
  esac
}

VALUE_OPTIONS="--project --region --emulator --package --transactions-topic --results-topic
  --dead-letter-topic --feedback-topic --dead-letter-subscription --watch-subscription
  --push-subscription --feedback-push-subscription --push-endpoint --feedback-push-endpoint
  --min-retry-delay --max-retry-delay --schema-name --schema-file --service-account --runtime
  --memory --cpu --concurrency --max-instances --min-instances --timeout --max-delivery-attempts
  --redis-url --vpc-connector --egress-settings --rules-file --model-path --staging-dir"
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
      --dry-run | --delete | --with-schema | --allow-unauthenticated | --force)
        ((inline)) && usage_error "$arg: takes no value, got '$value'"
        case $arg in
          --dry-run) DRY_RUN=1 ;;
          --delete) MODE=delete ;;
          --with-schema) WITH_SCHEMA=1 ;;
          --allow-unauthenticated) ALLOW_UNAUTHENTICATED=1 ;;
          --force) FORCE=1 ;;
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

check_whole_number() {
  local flag=$1 value=$2 min=$3 max=$4
  [[ $value =~ ^[0-9]+$ ]] || usage_error "$flag: must be a whole number, got '$value'"
  ((10#$value >= min && 10#$value <= max)) ||
    usage_error "$flag: must be between $min and $max, got $value"
}

check_no_comma() {
  local flag=$1 value=$2
  [[ $value != *,* ]] || usage_error "$flag: must not contain ',' (passed in --set-env-vars), got '$value'"
}

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
  else
    [[ -n $REGION ]] || usage_error "--region: is required (e.g. europe-west1) unless --emulator is given"
    [[ $REGION =~ ^[a-z]+-[a-z]+[0-9]+$ ]] ||
      usage_error "--region: must be a Cloud Functions region like europe-west1, got '$REGION'"
    local flag
    for flag in PUSH_ENDPOINT FEEDBACK_PUSH_ENDPOINT; do
      [[ -z ${!flag} ]] || usage_error "--$(lower "${flag//_/-}"): only with --emulator"
    done
  fi
  DEAD_LETTER_SUBSCRIPTION=${DEAD_LETTER_SUBSCRIPTION:-$DEAD_LETTER_TOPIC-keep}
  WATCH_SUBSCRIPTION=${WATCH_SUBSCRIPTION:-$RESULTS_TOPIC-watch}
  check_pubsub_name --transactions-topic "$TRANSACTIONS_TOPIC"
  check_pubsub_name --results-topic "$RESULTS_TOPIC"
  check_pubsub_name --dead-letter-topic "$DEAD_LETTER_TOPIC"
  check_pubsub_name --feedback-topic "$FEEDBACK_TOPIC"
  check_pubsub_name --dead-letter-subscription "$DEAD_LETTER_SUBSCRIPTION"
  check_pubsub_name --watch-subscription "$WATCH_SUBSCRIPTION"
  check_pubsub_name --push-subscription "$PUSH_SUBSCRIPTION"
  check_pubsub_name --feedback-push-subscription "$FEEDBACK_PUSH_SUBSCRIPTION"
  check_pubsub_name --schema-name "$SCHEMA_NAME"
  [[ -z $PUSH_ENDPOINT || $PUSH_ENDPOINT =~ ^https?://[^[:space:],]+$ ]] ||
    usage_error "--push-endpoint: must be an http(s) URL, got '$PUSH_ENDPOINT'"
  [[ -z $FEEDBACK_PUSH_ENDPOINT || $FEEDBACK_PUSH_ENDPOINT =~ ^https?://[^[:space:],]+$ ]] ||
    usage_error "--feedback-push-endpoint: must be an http(s) URL, got '$FEEDBACK_PUSH_ENDPOINT'"
  [[ $SERVICE_ACCOUNT =~ ^[a-z][a-z0-9-]{4,28}[a-z0-9]$ ]] ||
    usage_error "--service-account: must be an account id (6-30 lowercase letters, digits, -), got '$SERVICE_ACCOUNT'"
  check_whole_number --max-delivery-attempts "$MAX_DELIVERY_ATTEMPTS" 5 100
  check_whole_number --concurrency "$CONCURRENCY" 1 1000
  check_whole_number --max-instances "$MAX_INSTANCES" 1 1000
  check_whole_number --min-instances "$MIN_INSTANCES" 0 1000
  if ((WITH_SCHEMA)) && [[ $MODE == deploy && ! -f $SCHEMA_FILE ]]; then
    usage_error "--schema-file: no such file: $SCHEMA_FILE"
  fi
  if [[ -n $REDIS_URL ]]; then
    [[ $REDIS_URL =~ ^rediss?:// ]] || usage_error "--redis-url: must start with redis:// or rediss://, got '$REDIS_URL'"
  fi
  [[ -z $RULES_FILE || -f $RULES_FILE ]] || usage_error "--rules-file: no such file: $RULES_FILE"
  [[ -z $MODEL_PATH || $MODEL_PATH == none || -f $MODEL_PATH ]] ||
    usage_error "--model-path: no such file (or 'none'): $MODEL_PATH"
  check_no_comma --redis-url "$REDIS_URL"
  check_no_comma --rules-file "$(basename -- "${RULES_FILE:-x}")"
  check_no_comma --model-path "$(basename -- "${MODEL_PATH:-x}")"
  case $EGRESS_SETTINGS in
    private-ranges-only | all) ;;
    *) usage_error "--egress-settings: must be private-ranges-only or all, got '$EGRESS_SETTINGS'" ;;
  esac
}

# ---------------------------------------------------------------------------- packaging
# The upload: detector/ (no tests, no caches), a root main.py re-exporting the entry points,
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
    --exclude='*.pyi' detector | tar -C "$dir" -xf -
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

# The four topics; the ones missing (without a schema) are created by one command.
ensure_topics() {
  local topic missing=() schema_args=(--schema="$SCHEMA_NAME" --message-encoding=json)
  for topic in "$TRANSACTIONS_TOPIC" "$RESULTS_TOPIC" "$DEAD_LETTER_TOPIC" "$FEEDBACK_TOPIC"; do
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

# Emulator only: a push subscription standing in for the Eventarc trigger of a function.
ensure_push_subscription() {
  local subscription=$1 topic=$2 endpoint=$3
  local policy_flags=(--dead-letter-topic="$DEAD_LETTER_TOPIC" --max-delivery-attempts="$MAX_DELIVERY_ATTEMPTS"
    --min-retry-delay="$MIN_RETRY_DELAY" --max-retry-delay="$MAX_RETRY_DELAY")
  if ! has_row "$SUBSCRIPTIONS" "$subscription"; then
    change "create push subscription $subscription on $topic" gcloud pubsub subscriptions create \
      "$subscription" --project="$PROJECT" --topic="$topic" --push-endpoint="$endpoint" "${policy_flags[@]}"
    return
  fi
  check_subscription_topic "$subscription" "$topic"
  local row expected
  row=$(printf '%s\n' "$SUBSCRIPTIONS" | awk -F, -v n="$subscription" '$1 == n { print; exit }')
  expected="$subscription,$topic,$endpoint,$DEAD_LETTER_TOPIC,$MAX_DELIVERY_ATTEMPTS,$MIN_RETRY_DELAY,$MAX_RETRY_DELAY"
  if [[ $row == "$expected" ]]; then
    unchanged "push subscription $subscription exists"
  else
    change "update push subscription $subscription (endpoint, dead-letter and retry policy)" \
      gcloud pubsub subscriptions update "$subscription" --project="$PROJECT" \
      --push-endpoint="$endpoint" "${policy_flags[@]}"
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

ensure_topic_binding() {
  local topic=$1 policy=$2 role=$3 member=$4
  if has_binding "$policy" "$role" "$member"; then
    unchanged "$member has $role on topic $topic"
  else
    change_retried "grant $role on topic $topic to $member" gcloud pubsub topics \
      add-iam-policy-binding "$topic" --project="$PROJECT" --member="$member" --role="$role"
  fi
}

# ---------------------------------------------------------------------------- functions
FUNCTIONS="" # CSV lines: name,digest label
SA_EMAIL=""

env_vars() {
  local feedback=$1 vars
  vars="GOOGLE_CLOUD_PROJECT=$PROJECT,RESULTS_TOPIC=$RESULTS_TOPIC,DEAD_LETTER_TOPIC=$DEAD_LETTER_TOPIC"
  ((feedback)) && vars+=",FEEDBACK_TOPIC=$FEEDBACK_TOPIC"
  [[ -n $RULES_ENV ]] && vars+=",RULES_FILE=$RULES_ENV"
  [[ -n $MODEL_ENV ]] && vars+=",MODEL_PATH=$MODEL_ENV"
  [[ -n $REDIS_URL ]] && vars+=",REDIS_URL=$REDIS_URL"
  printf '%s' "$vars"
}

# deploy_function NAME ENTRY_POINT SOURCE_DIGEST TRIGGER_ARGS...
deploy_function() {
  local name=$1 entry_point=$2 digest=$3
  shift 3
  local feedback=0
  [[ $name == "$FEEDBACK_FUNCTION" ]] && feedback=1
  local args=(gcloud functions deploy "$name" --gen2 --project="$PROJECT" --region="$REGION"
    --runtime="$RUNTIME" --source="$STAGING_DIR" --entry-point="$entry_point" "$@"
    --run-service-account="$SA_EMAIL" --memory="$MEMORY" --cpu="$CPU"
    --concurrency="$CONCURRENCY" --max-instances="$MAX_INSTANCES" --min-instances="$MIN_INSTANCES"
    --timeout="$TIMEOUT" --set-env-vars="$(env_vars "$feedback")")
  if [[ -n $VPC_CONNECTOR ]]; then
    args+=(--vpc-connector="$VPC_CONNECTOR" --egress-settings="$EGRESS_SETTINGS")
  fi
  # The label records what was deployed: same source and same flags means nothing to do.
  local config
  # The upload's location is not part of it (its contents are): a clone elsewhere is the same.
  config=$( (printf '%s\n' "$digest" "${args[@]/#--source=*/--source}") | sha256 | cut -c1-32)
  args+=(--update-labels="$DIGEST_LABEL=$config" --quiet)
  local current
  current=$(csv_field "$FUNCTIONS" "$name" 2)
  if ((!FORCE)) && has_row "$FUNCTIONS" "$name" && [[ $current == "$config" ]]; then
    unchanged "function $name is deployed with this source and these settings"
  else
    ((DRY_RUN)) || say "deploying function $name (Cloud Build takes a few minutes)"
    change "deploy function $name" "${args[@]}"
  fi
}

# The Eventarc trigger's subscription gets a dead-letter policy; the Pub/Sub service agent
# must be able to read from it (to forward) and publish to the dead-letter topic.
configure_trigger() {
  local name=$1 placeholder
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
    --format='csv[no-heading](deadLetterPolicy.deadLetterTopic.basename(),deadLetterPolicy.maxDeliveryAttempts)'
  if [[ $OUT == "$DEAD_LETTER_TOPIC,$MAX_DELIVERY_ATTEMPTS" ]]; then
    unchanged "subscription $short of $name dead-letters to $DEAD_LETTER_TOPIC"
  else
    change "set dead-letter policy on subscription $short of $name" gcloud pubsub subscriptions \
      update "$subscription" --project="$PROJECT" --dead-letter-topic="$DEAD_LETTER_TOPIC" \
      --max-delivery-attempts="$MAX_DELIVERY_ATTEMPTS"
  fi
  policy_lines "read the IAM policy of subscription $short" gcloud pubsub subscriptions \
    get-iam-policy "$subscription" --project="$PROJECT"
  if has_binding "$OUT" roles/pubsub.subscriber "$PUBSUB_AGENT"; then
    unchanged "$PUBSUB_AGENT has roles/pubsub.subscriber on subscription $short"
  else
    change "grant roles/pubsub.subscriber on subscription $short to $PUBSUB_AGENT" gcloud pubsub \
      subscriptions add-iam-policy-binding "$subscription" --project="$PROJECT" \
      --member="$PUBSUB_AGENT" --role=roles/pubsub.subscriber
  fi
  # Eventarc pushes to the function as the dedicated service account.
  policy_lines "read the IAM policy of function $name" gcloud run services get-iam-policy "$name" \
    --project="$PROJECT" --region="$REGION"
  if has_binding "$OUT" roles/run.invoker "serviceAccount:$SA_EMAIL"; then
    unchanged "serviceAccount:$SA_EMAIL may invoke $name"
  else
    change "grant roles/run.invoker on $name to serviceAccount:$SA_EMAIL" gcloud functions \
      add-invoker-policy-binding "$name" --project="$PROJECT" --region="$REGION" \
      --member="serviceAccount:$SA_EMAIL"
  fi
}

# ---------------------------------------------------------------------------- modes
PUBSUB_AGENT=""

deploy_cloud() {
  SA_EMAIL="$SERVICE_ACCOUNT@$PROJECT.iam.gserviceaccount.com"

  section "stage the function source in $STAGING_DIR (done locally, also in a dry run)"
  package_source "$STAGING_DIR"
  local digest
  digest=$(source_digest "$STAGING_DIR")
  ((DRY_RUN)) || say "staged the function source in $STAGING_DIR"

  section "enable APIs"
  query "list enabled APIs" "" gcloud services list --enabled --project="$PROJECT" --format='value(config.name)'
  local api missing=()
  for api in "${REQUIRED_APIS[@]}"; do
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

  section "dead-letter subscription"
  list_subscriptions
  ensure_pull_subscription "$DEAD_LETTER_SUBSCRIPTION" "$DEAD_LETTER_TOPIC"

  section "service account"
  query "list service accounts" "" gcloud iam service-accounts list --project="$PROJECT" --format='value(email)'
  if printf '%s\n' "$OUT" | grep -Fxq -- "$SA_EMAIL"; then
    unchanged "service account $SA_EMAIL exists"
  else
    change "create service account $SA_EMAIL" gcloud iam service-accounts create "$SERVICE_ACCOUNT" \
      --project="$PROJECT" --display-name='Fraud detector functions' \
      --description='Runs the fraud detector functions; created by deploy.sh'
  fi

  section "publish permissions"
  local sa_member="serviceAccount:$SA_EMAIL"
  policy_lines "read the IAM policy of topic $RESULTS_TOPIC" gcloud pubsub topics get-iam-policy \
    "$RESULTS_TOPIC" --project="$PROJECT"
  ensure_topic_binding "$RESULTS_TOPIC" "$OUT" roles/pubsub.publisher "$sa_member"
  policy_lines "read the IAM policy of topic $DEAD_LETTER_TOPIC" gcloud pubsub topics get-iam-policy \
    "$DEAD_LETTER_TOPIC" --project="$PROJECT"
  ensure_topic_binding "$DEAD_LETTER_TOPIC" "$OUT" roles/pubsub.publisher "$sa_member"
  ensure_topic_binding "$DEAD_LETTER_TOPIC" "$OUT" roles/pubsub.publisher "$PUBSUB_AGENT"
  # Pub/Sub signs the push requests of the triggers as this account (needed on projects
  # whose Pub/Sub service agent predates April 2021; harmless elsewhere).
  policy_lines "read the IAM policy of service account $SA_EMAIL" gcloud iam service-accounts \
    get-iam-policy "$SA_EMAIL" --project="$PROJECT"
  if has_binding "$OUT" roles/iam.serviceAccountTokenCreator "$PUBSUB_AGENT"; then
    unchanged "$PUBSUB_AGENT has roles/iam.serviceAccountTokenCreator on $SA_EMAIL"
  else
    change_retried "grant roles/iam.serviceAccountTokenCreator on $SA_EMAIL to $PUBSUB_AGENT" \
      gcloud iam service-accounts add-iam-policy-binding "$SA_EMAIL" --project="$PROJECT" \
      --member="$PUBSUB_AGENT" --role=roles/iam.serviceAccountTokenCreator
  fi

  section "functions"
  query "list functions" "" gcloud functions list --v2 --project="$PROJECT" --regions="$REGION" \
    --format="csv[no-heading](name.basename(),labels.$DIGEST_LABEL)"
  FUNCTIONS=$OUT
  deploy_function "$DETECT_FUNCTION" detect_fraud "$digest" \
    --trigger-topic="$TRANSACTIONS_TOPIC" --retry --trigger-service-account="$SA_EMAIL"
  deploy_function "$FEEDBACK_FUNCTION" record_feedback "$digest" \
    --trigger-topic="$FEEDBACK_TOPIC" --retry --trigger-service-account="$SA_EMAIL"
  local access=--no-allow-unauthenticated
  ((ALLOW_UNAUTHENTICATED)) && access=--allow-unauthenticated
  deploy_function "$SCORE_FUNCTION" score_transaction "$digest" --trigger-http "$access"

  section "dead-letter policies of the triggers"
  configure_trigger "$DETECT_FUNCTION"
  configure_trigger "$FEEDBACK_FUNCTION"
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
  ensure_pull_subscription "$WATCH_SUBSCRIPTION" "$RESULTS_TOPIC"
  if [[ -n $PUSH_ENDPOINT ]]; then
    ensure_push_subscription "$PUSH_SUBSCRIPTION" "$TRANSACTIONS_TOPIC" \
      "$PUSH_ENDPOINT/projects/$PROJECT/topics/$TRANSACTIONS_TOPIC"
  fi
  if [[ -n $FEEDBACK_PUSH_ENDPOINT ]]; then
    ensure_push_subscription "$FEEDBACK_PUSH_SUBSCRIPTION" "$FEEDBACK_TOPIC" \
      "$FEEDBACK_PUSH_ENDPOINT/projects/$PROJECT/topics/$FEEDBACK_TOPIC"
  fi
}

# delete_present WHAT EXISTING DRY_PRESENT NAME...: one delete command for the names that exist
# (in a dry run, all of them). WHAT is "subscriptions" or "topics".
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
  fi

  section "subscriptions"
  list_subscriptions
  if [[ -n $EMULATOR ]]; then
    delete_present subscriptions "$SUBSCRIPTIONS" "$DEAD_LETTER_SUBSCRIPTION" "$WATCH_SUBSCRIPTION" \
      "$PUSH_SUBSCRIPTION" "$FEEDBACK_PUSH_SUBSCRIPTION"
  else
    delete_present subscriptions "$SUBSCRIPTIONS" "$DEAD_LETTER_SUBSCRIPTION"
  fi

  section "topics"
  list_topics
  delete_present topics "$TOPICS" "$TRANSACTIONS_TOPIC" "$RESULTS_TOPIC" "$DEAD_LETTER_TOPIC" \
    "$FEEDBACK_TOPIC"

  section "schema"
  query "list schemas" "" gcloud pubsub schemas list --project="$PROJECT" --format='value(name.basename())'
  if printf '%s\n' "$OUT" | grep -Fxq -- "$SCHEMA_NAME" || ((DRY_RUN)); then
    change "delete schema $SCHEMA_NAME" gcloud pubsub schemas delete "$SCHEMA_NAME" \
      --project="$PROJECT" --quiet
  else
    unchanged "schema $SCHEMA_NAME is absent"
  fi

  if [[ -z $EMULATOR ]]; then
    section "service account"
    SA_EMAIL="$SERVICE_ACCOUNT@$PROJECT.iam.gserviceaccount.com"
    query "list service accounts" "" gcloud iam service-accounts list --project="$PROJECT" --format='value(email)'
    if printf '%s\n' "$OUT" | grep -Fxq -- "$SA_EMAIL" || ((DRY_RUN)); then
      change "delete service account $SA_EMAIL" gcloud iam service-accounts delete "$SA_EMAIL" \
        --project="$PROJECT" --quiet
    else
      unchanged "service account $SA_EMAIL is absent"
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
