#!/usr/bin/env bash
# gpuctl GPU node: the entrypoint of the ollama/ollama container.
#
# Starts `ollama serve` in the background, waits until it answers, pulls every model in
# GPUCTL_PULL_MODELS in order (with retries), then keeps the server in the foreground.
# SIGTERM and SIGINT are forwarded to ollama (as SIGTERM: a background job of a
# non-interactive shell ignores SIGINT), so `docker compose stop` shuts it down cleanly.
#
# Ollama answers requests while the pulls run: a resumed GPU serves the models already on
# its volume at once instead of waiting for the registry.
#
# A model that fails every attempt is reported and skipped by default: the node still
# serves everything else, and the gateway, which routes by each node's /api/tags, simply
# does not send that model here. Stopping instead would make the restart policy loop on a
# registry outage, burning GPU credits while serving nothing. Set GPUCTL_PULL_STRICT=1
# where an incomplete node is worse than none.
#
# Environment (all optional):
#   GPUCTL_PULL_MODELS            comma-separated models, e.g. "llama3.2,qwen2.5:7b".
#                                 Not OLLAMA_MODELS: that is Ollama's model directory.
#   GPUCTL_PULL_ATTEMPTS          tries per model (default 5)
#   GPUCTL_PULL_BACKOFF_SECONDS   wait before the 2nd try; doubles per try, at most 300
#                                 (default 5)
#   GPUCTL_PULL_TIMEOUT_SECONDS   time limit of one try, 0 for none (default 0)
#   GPUCTL_PULL_STRICT            1: stop the node when a model cannot be pulled (default 0)
#   GPUCTL_START_TIMEOUT_SECONDS  how long `ollama serve` may take to answer (default 120)
#
# Exit codes:
#   64    a GPUCTL_* variable is malformed (nothing was started)
#   69    `ollama serve` did not answer within GPUCTL_START_TIMEOUT_SECONDS, or died first
#   75    a model failed every pull attempt and GPUCTL_PULL_STRICT=1
#   else  the exit status of `ollama serve` when it stops (0 after a clean SIGTERM)

set -euo pipefail

readonly EX_CONFIG=64
readonly EX_UNAVAILABLE=69
readonly EX_PULL_FAILED=75
readonly MAX_BACKOFF_SECONDS=300
readonly MAX_PROBE_SECONDS=10
readonly STOP_GRACE_TENTHS=100 # 10 s for ollama to stop before SIGKILL

server_pid=""
server_status=0
models=()

log() {
    printf 'gpuctl-node: %s\n' "$*" >&2
}

die() {
    local code=$1
    shift
    log "ERROR: $*"
    exit "$code"
}

# read_int NAME DEFAULT MIN: validate the variable NAME (default DEFAULT) as a whole number
# >= MIN and store it back normalised (so "010" is 10, not octal 8).
read_int() {
    local name=$1 default=$2 min=$3 value
    value=${!name:-$default}
    if [[ ! $value =~ ^[0-9]{1,6}$ ]] || ((10#$value < min)); then
        die "$EX_CONFIG" "$name must be a whole number >= $min (got '$value')"
    fi
    printf -v "$name" '%d' "$((10#$value))"
}

# read_bool NAME: accept 1/true/yes and 0/false/no/empty; store 1 or 0.
read_bool() {
    local name=$1 value
    value=${!name:-0}
    case ${value,,} in
        1 | true | yes) printf -v "$name" '1' ;;
        0 | false | no) printf -v "$name" '0' ;;
        *) die "$EX_CONFIG" "$name must be 1 or 0 (got '$value')" ;;
    esac
}

# parse_models LIST: split on commas, trim blanks, drop empties and repeats, keep order.
parse_models() {
    local raw item
    local -A seen=()
    IFS=',' read -r -a raw <<<"$1"
    for item in "${raw[@]}"; do
        item=${item#"${item%%[![:space:]]*}"}
        item=${item%"${item##*[![:space:]]}"}
        [[ -n $item ]] || continue
        if [[ ! $item =~ ^[A-Za-z0-9][A-Za-z0-9._:/-]*$ ]]; then
            die "$EX_CONFIG" "GPUCTL_PULL_MODELS: '$item' is not a model name like 'llama3.2' or 'qwen2.5:7b'"
        fi
        [[ -z ${seen[$item]:-} ]] || continue
        seen[$item]=1
        models+=("$item")
    done
}

# run_child CMD...: run CMD in the background and wait for it, so that a signal reaches our
# trap at once instead of after CMD ends. Returns CMD's exit status.
run_child() {
    local status=0
    "$@" &
    wait "$!" || status=$?
    return "$status"
}

# The next three functions run only from traps, which ShellCheck 0.9 does not follow
# (SC2317: "unreachable"); the directives say so instead of hiding real findings.

# stop_server: SIGTERM ollama, give it STOP_GRACE_TENTHS/10 s, then SIGKILL. Sets
# server_status to its exit status.
# shellcheck disable=SC2317
stop_server() {
    local tenths=0
    [[ -n $server_pid ]] || return 0
    kill -TERM "$server_pid" 2>/dev/null || true
    while kill -0 "$server_pid" 2>/dev/null && ((tenths < STOP_GRACE_TENTHS)); do
        sleep 0.1
        tenths=$((tenths + 1))
    done
    if kill -0 "$server_pid" 2>/dev/null; then
        log "ollama serve ignored SIGTERM for $((STOP_GRACE_TENTHS / 10))s; killing it"
        kill -KILL "$server_pid" 2>/dev/null || true
    fi
    server_status=0
    wait "$server_pid" || server_status=$?
    server_pid=""
}

# shellcheck disable=SC2317
on_signal() {
    trap '' TERM INT
    log "received SIG$1: stopping ollama serve"
    # Every running job but the server: the current pull, probe or sleep, including one
    # started an instant before the signal, before run_child could note its pid.
    local pid
    local -a jobs_running=()
    mapfile -t jobs_running < <(jobs -pr)
    for pid in "${jobs_running[@]}"; do
        if [[ $pid != "$server_pid" ]]; then
            kill -TERM "$pid" 2>/dev/null || true
        fi
    done
    stop_server
    log "ollama serve stopped with status $server_status"
    exit "$server_status"
}

# shellcheck disable=SC2317
on_exit() {
    if [[ -n $server_pid ]]; then
        stop_server
    fi
}

start_server() {
    ollama serve &
    server_pid=$!
    log "started ollama serve (pid $server_pid)"
}

wait_until_ready() {
    local deadline=$((SECONDS + GPUCTL_START_TIMEOUT_SECONDS)) remaining status
    log "waiting up to ${GPUCTL_START_TIMEOUT_SECONDS}s for ollama serve to answer"
    while true; do
        if ! kill -0 "$server_pid" 2>/dev/null; then
            status=0
            wait "$server_pid" || status=$?
            server_pid=""
            die "$EX_UNAVAILABLE" "ollama serve exited with status $status before it answered"
        fi
        remaining=$((deadline - SECONDS))
        if ((remaining <= 0)); then
            die "$EX_UNAVAILABLE" "ollama serve did not answer within ${GPUCTL_START_TIMEOUT_SECONDS}s (GPUCTL_START_TIMEOUT_SECONDS); stopping"
        fi
        if run_child timeout "$((remaining < MAX_PROBE_SECONDS ? remaining : MAX_PROBE_SECONDS))" \
            ollama list >/dev/null 2>&1; then
            log "ollama serve is answering"
            return 0
        fi
        run_child sleep 1
    done
}

# failure_reason FILE: what a failed `ollama pull` said: its last "Error: ..." line (the Go
# CLI's way to report), else its last non-blank line. Progress bars use \r and ANSI codes.
failure_reason() {
    local text reason
    text=$(tr '\r' '\n' <"$1" | sed -e 's/\x1b\[[0-9;?]*[A-Za-z]//g' | grep -v '^[[:space:]]*$' || true)
    reason=$(grep '^Error:' <<<"$text" | tail -n 1 || true)
    printf '%s' "${reason:-$(tail -n 1 <<<"$text")}"
}

# pull_model MODEL: pull with retries and backoff. Returns 0 on success, 1 when every
# attempt failed.
pull_model() {
    local model=$1 attempt status output detail
    local delay=$GPUCTL_PULL_BACKOFF_SECONDS started=$SECONDS
    local -a cmd=(ollama pull "$model")
    if ((GPUCTL_PULL_TIMEOUT_SECONDS > 0)); then
        cmd=(timeout "$GPUCTL_PULL_TIMEOUT_SECONDS" "${cmd[@]}")
    fi
    output=$(mktemp)
    for ((attempt = 1; attempt <= GPUCTL_PULL_ATTEMPTS; attempt++)); do
        if ! kill -0 "$server_pid" 2>/dev/null; then
            log "ollama serve has stopped: not pulling $model"
            break
        fi
        log "pulling $model (attempt $attempt/$GPUCTL_PULL_ATTEMPTS)"
        status=0
        run_child "${cmd[@]}" >"$output" 2>&1 </dev/null || status=$?
        if ((status == 0)); then
            log "pulled $model in $((SECONDS - started))s"
            rm -f "$output"
            return 0
        fi
        if ((status == 124 && GPUCTL_PULL_TIMEOUT_SECONDS > 0)); then
            detail="timed out after ${GPUCTL_PULL_TIMEOUT_SECONDS}s (GPUCTL_PULL_TIMEOUT_SECONDS)"
        else
            detail="exit status $status: $(failure_reason "$output")"
        fi
        if ((attempt < GPUCTL_PULL_ATTEMPTS)); then
            log "pull of $model failed ($detail); retrying in ${delay}s"
            run_child sleep "$delay"
            delay=$((delay * 2 > MAX_BACKOFF_SECONDS ? MAX_BACKOFF_SECONDS : delay * 2))
        else
            log "pull of $model failed ($detail); giving up after $attempt attempts"
        fi
    done
    rm -f "$output"
    return 1
}

pull_all() {
    local model
    local -a failed=()
    if ((${#models[@]} == 0)); then
        log "GPUCTL_PULL_MODELS is empty: serving the models already on the volume"
        return 0
    fi
    log "pulling ${#models[@]} model(s) in order: ${models[*]}"
    for model in "${models[@]}"; do
        if ! kill -0 "$server_pid" 2>/dev/null; then
            log "ollama serve has stopped: skipping the remaining pulls"
            return 0
        fi
        if pull_model "$model"; then
            continue
        fi
        if ((GPUCTL_PULL_STRICT == 1)); then
            die "$EX_PULL_FAILED" "could not pull $model and GPUCTL_PULL_STRICT=1: stopping the node"
        fi
        failed+=("$model")
    done
    if ((${#failed[@]} > 0)); then
        log "WARNING: could not pull ${#failed[@]} of ${#models[@]} model(s): ${failed[*]}; serving the rest"
    else
        log "all ${#models[@]} model(s) pulled"
    fi
}

serve_foreground() {
    local status=0
    log "serving; waiting for ollama serve to exit"
    wait "$server_pid" || status=$?
    server_pid=""
    log "ollama serve exited with status $status"
    exit "$status"
}

main() {
    read_int GPUCTL_PULL_ATTEMPTS 5 1
    read_int GPUCTL_PULL_BACKOFF_SECONDS 5 0
    read_int GPUCTL_PULL_TIMEOUT_SECONDS 0 0
    read_int GPUCTL_START_TIMEOUT_SECONDS 120 1
    read_bool GPUCTL_PULL_STRICT
    parse_models "${GPUCTL_PULL_MODELS:-}"

    trap 'on_signal TERM' TERM
    trap 'on_signal INT' INT
    trap on_exit EXIT

    start_server
    wait_until_ready
    pull_all
    serve_foreground
}

main "$@"
