#!/bin/sh
# Fake GitHub Actions runner for outrunner.testing.FakeGitHub, for tiny container images.
#
# Same protocol as outrunner/testing/agent.py (see the outrunner.testing.fakegithub docstring),
# written for a POSIX sh and busybox applets only: wget (--post-data, --header), base64 -d, sed,
# sleep, cat, printf. Usage, like the real runner's run.sh:
#
#   agent.sh --jitconfig <encodedJITConfig> [--poll-timeout SECONDS]
#   ACTIONS_RUNNER_INPUT_JITCONFIG=<encodedJITConfig> agent.sh
#
# Exits 0 once its job is reported (whatever the job's result), 1 with an
# "outrunner-agent: error: ..." line on stderr otherwise, 2 on bad usage. The JIT config is a
# credential and is never printed.
set -u

die() {
	printf 'outrunner-agent: error: %s\n' "$1" >&2
	exit "${2:-1}"
}

jit=""
poll=30
while [ $# -gt 0 ]; do
	case "$1" in
	--jitconfig)
		[ $# -ge 2 ] || die "--jitconfig needs a value" 2
		jit=$2
		shift 2
		;;
	--jitconfig=*)
		jit=${1#--jitconfig=}
		shift
		;;
	--poll-timeout)
		[ $# -ge 2 ] || die "--poll-timeout needs a value" 2
		poll=$2
		shift 2
		;;
	*) die "unknown argument: $1" 2 ;;
	esac
done
[ -n "$jit" ] || jit=${ACTIONS_RUNNER_INPUT_JITCONFIG:-}
[ -n "$jit" ] || die "no JIT config: pass --jitconfig or set ACTIONS_RUNNER_INPUT_JITCONFIG" 2

config=$(printf '%s' "$jit" | base64 -d 2>/dev/null) || die "the JIT config is not base64"

# The fake keeps its JIT config flat and escape-free precisely so this sed can read it:
# "key":"string" or "key":number (spaces after the colon tolerated).
field() {
	printf '%s' "$config" | sed -n "s/.*\"$1\": *\"\{0,1\}\([^\",}]*\).*/\1/p"
}
url=$(field url)
credential=$(field credential)
runner_name=$(field runner_name)
[ -n "$url" ] && [ -n "$credential" ] || die "the JIT config lacks url or credential"

# post PATH DATA: POST to the fake. Sets $answer (wget's -S response headers, indented, then the
# body lines) and $status (the HTTP status, empty when there was no answer); returns wget's status.
# -S is what makes the status of an error visible: neither wget keeps an error's body.
# -Y off: the fake is reached directly; a proxy from the environment is never right.
post() {
	answer=$(wget -q -S -Y off -O - --header "Authorization: Bearer $credential" \
		--post-data "$2" "$url$1" 2>&1)
	rc=$?
	status=$(printf '%s\n' "$answer" | sed -n 's/^ *HTTP\/[0-9.]* \([0-9][0-9]*\).*/\1/p' |
		sed -n '$p')
	return $rc
}

# refused WHAT WGET_STATUS: exit with the clearest reason available.
refused() {
	[ -z "$status" ] || die "$1 refused: HTTP $status"
	die "$1 failed: cannot reach $url (wget exit status $2)"
}

value() {
	printf '%s\n' "$answer" | sed -n "s/^$1=//p"
}

# Connect until the fake hands out a job: 200 with key=value lines. A 204 ("no job yet") is a
# success for wget without a body, so ask again; any error status makes wget fail.
while :; do
	post /_agent/connect "wait=$poll" || refused connect $?
	job_id=$(value job_id)
	[ -z "$job_id" ] || break
	[ "$status" != 200 ] || die "connect answered 200 without a job"
done

duration=$(value duration)
result=$(value result)
display_name=$(value display_name)
printf 'Runner %s running job: %s\n' "$runner_name" "$display_name"

sleep "${duration:-0}" || die "cannot sleep '$duration'"

post /_agent/complete "job_id=$job_id&result=${result:-succeeded}" || refused complete $?
printf 'Job %s completed with result: %s\n' "$display_name" "${result:-succeeded}"
