#!/usr/bin/env bash
# One maintenance window, as .github/workflows/patch-window.yml runs it (docs/patching.md, "The
# scheduled workflow"):
#   1. `fleet policy check-schedule`: the workflow's cron and timeout agree with the policy's windows,
#      else red and nothing is started (a schedule that never meets a window would stay green forever);
#   2. the journal's latest run unfinished (paused, blocked, or `running` with its runner killed):
#      `fleet patch resume`, with --steal-lock only when `fleet patch status --brief` says the lock is
#      stale (dead PID on this machine, or no heartbeat for timeouts.lock_stale); else `fleet patch run`;
#   3. the exit code decides the colour:
#        0 done                            green
#        3 refused / paused                green with a ::notice:: saying why (the next window goes on)
#        4 blocked by preflight            red with ::error:: (UPS, fabric, capacity: a person must look)
#        1 failed / rolled back            red with ::error::
#        5 partly done, 6 nothing done     red with ::error::; FLEET_CI_ON_PARTIAL=warn: ::warning::, green
#        anything else (2 bad input, ...)  red
#      and the run's summary is printed either way.
#
# Inputs (env): RELEASE, INVENTORY, POLICY, JOURNAL, REPORTS (report directory of this job),
# FLEET (the fleet executable, default .venv/bin/fleet), optional LIMIT (an Ansible host pattern),
# WORKFLOW (default .github/workflows/patch-window.yml), FLEET_CI_ON_PARTIAL (fail | warn, default fail).
set -euo pipefail

FLEET=${FLEET:-.venv/bin/fleet}
WORKFLOW=${WORKFLOW:-.github/workflows/patch-window.yml}
LIMIT=${LIMIT:-}
ON_PARTIAL=${FLEET_CI_ON_PARTIAL:-fail}

# A GitHub annotation on one line (its message escaped as the runner expects).
annotate() {
  local level=$1 message=$2
  message=${message//'%'/'%25'}
  message=${message//$'\r'/'%0D'}
  message=${message//$'\n'/'%0A'}
  echo "::${level}::${message}"
}

die() {
  annotate error "$1"
  exit "${2:-1}"
}

for name in RELEASE INVENTORY POLICY JOURNAL REPORTS; do
  [[ -n ${!name:-} ]] || die "patch-window: \$$name is not set" 2
done
case $ON_PARTIAL in
  fail | warn) ;;
  *) die "patch-window: FLEET_CI_ON_PARTIAL must be fail or warn, not '$ON_PARTIAL'" 2 ;;
esac

# --- 1. the schedule agrees with the policy -----------------------------------------------------------
if ! "$FLEET" policy check-schedule --policy "$POLICY" --workflow "$WORKFLOW"; then
  die "the schedule of $WORKFLOW and the windows of $POLICY disagree (fleet policy check-schedule above): no run started"
fi

# --- 2. resume the unfinished run, or start one ---------------------------------------------------------
# `fleet patch status --brief`: one line `run=12 status=paused release=2026-11 lock=stale`
declare -A state=([run]=none [status]=none [release]=none [lock]=free)
line=$("$FLEET" patch status --journal "$JOURNAL" --brief) ||
  die "cannot read the journal $JOURNAL (fleet patch status --brief exited $?)" 2
read -r -a pairs <<<"$line"
for pair in "${pairs[@]}"; do
  state[${pair%%=*}]=${pair#*=}
done
echo "journal $JOURNAL: run ${state[run]} ${state[status]} (release ${state[release]}), lock ${state[lock]}"

case ${state[status]} in
  running | paused | blocked)
    command=(patch resume --journal "$JOURNAL" --report-dir "$REPORTS")
    if [[ ${state[lock]} == stale ]]; then
      # its runner is gone (killed with the job, or the machine rebooted): take the lock it left
      command+=(--steal-lock)
    fi
    echo "run ${state[run]} is ${state[status]}: resuming it"
    ;;
  *)
    command=(patch run --release "$RELEASE" --inventory "$INVENTORY" --policy "$POLICY"
      --journal "$JOURNAL" --report-dir "$REPORTS")
    if [[ -n $LIMIT ]]; then
      command+=(--limit "$LIMIT")
    fi
    ;;
esac

log=$(mktemp)
trap 'rm -f "$log"' EXIT
echo "+ $FLEET ${command[*]}"
rc=0
"$FLEET" "${command[@]}" 2>&1 | tee "$log" || rc=$?

# What the run said last about why it stopped (refused: ..., run N: paused: ..., error: ...).
why() {
  local line
  line=$(grep -E '^(refused: |error: |run [0-9]+: )' "$log" | tail -n 1 || true)
  echo "${line:-$1}"
}

# --- 3. the summary, then the colour ---------------------------------------------------------------------
echo "--- summary (fleet exited $rc)"
"$FLEET" patch status --journal "$JOURNAL" --brief || true
if [[ -f $REPORTS/summary.md ]]; then
  cat "$REPORTS/summary.md"
else
  echo "(no report: nothing was started)"
fi

case $rc in
  0)
    echo "done: every selected host is on the bundle"
    ;;
  3)
    annotate notice "nothing started in this window: $(why 'refused (window, freeze or lock)'); nothing is wrong, the next window continues"
    ;;
  4)
    die "blocked by preflight: $(why 'a wave was refused'); a person must look (UPS, fabric, capacity), then the next window (or fleet patch resume) retries" 4
    ;;
  1)
    die "the rollout failed: $(why 'see the log'); see the reports" 1
    ;;
  5 | 6)
    if [[ $rc -eq 5 ]]; then what="partly done"; else what="nothing done"; fi
    message="$what: $(why 'some selected hosts are not on the bundle') (skipped hosts are named in the summary)"
    if [[ $ON_PARTIAL == warn ]]; then
      annotate warning "$message"
    else
      die "$message; FLEET_CI_ON_PARTIAL=warn makes this a warning" "$rc"
    fi
    ;;
  *)
    die "fleet exited $rc: $(why 'see the log')" "$rc"
    ;;
esac
