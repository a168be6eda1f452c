#!/bin/sh
# Fake GitHub Actions runner for outrunner.testing.FakeGitHub, for tiny container images.
#
# Same protocol as outrunner/testing/agent.py (see the outrunner.testing.fakegithub docstring),
# written for a POSIX sh and busybox applets only: wget (--post-data, --header), base64 -d, sed,
# sleep, cat, printf. Usage, like the real runner's run.sh:
#
#   agent.sh --jitconfig <encodedJITConfig> [--poll-timeout SECONDS] [--retry-for SECONDS]
#   ACTIONS_RUNNER_INPUT_JITCONFIG=<encodedJITConfig> agent.sh
#
# Like the real runner with its broker connection, it rides out outages: a 5xx answer or no
# answer at all (connection refused or reset) is retried after 0.2 s, doubling up to 2 s, for up
# to --retry-for seconds (default 600, 0: never) from a call's first failure; 4xx answers are
# final (401 unknown credential, 404 runner removed, 409 credential already used).
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
retry_for=600
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
	--retry-for)
		[ $# -ge 2 ] || die "--retry-for needs a value" 2
		retry_for=$2
		shift 2
		;;
	*) die "unknown argument: $1" 2 ;;
	esac
done
[ -n "$jit" ] || jit=${ACTIONS_RUNNER_INPUT_JITCONFIG:-}
[ -n "$jit" ] || die "no JIT config: pass --jitconfig or set ACTIONS_RUNNER_INPUT_JITCONFIG" 2

# centis SECONDS: seconds ("2", "0.5", "1.25") as whole centiseconds, for sh's integer arithmetic.
centis() {
	case "$1" in '' | . | *[!0-9.]* | *.*.*) return 1 ;; esac
	whole=${1%%.*}
	frac=${1#"$whole"}
	frac=${frac#.}00
	frac=${frac%"${frac#??}"}
	# Leading zeros would make $((...)) read octal.
	n=${whole:-0}$frac
	n=${n#"${n%%[!0]*}"}
	printf '%s\n' "${n:-0}"
}
retry_centis=$(centis "$retry_for") || die "--retry-for needs a number of seconds, not '$retry_for'" 2

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

# now: a clock in centiseconds, from /proc/uptime (monotonic) or else from date.
now() {
	if [ -r /proc/uptime ]; then
		read -r up _ </proc/uptime
		centis "$up"
	else
		printf '%s00\n' "$(date +%s)"
	fi
}

# post PATH DATA: POST to the fake. Sets $answer (wget's -S response headers, indented, then the
# body lines) and $status (the HTTP status, empty when there was no answer); returns wget's status.
# -S is what makes the status of an error visible: neither wget keeps an error's body.
# -Y off: the fake is reached directly; a proxy from the environment is never right. -t 1: GNU
# wget would otherwise retry on its own (busybox ignores it); call() decides what to retry.
post() {
	answer=$(wget -q -S -t 1 -Y off -O - --header "Authorization: Bearer $credential" \
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

# call WHAT PATH DATA: post, retrying 5xx answers and no answer at all until --retry-for has
# passed since the first failure; exits through refused() when the call fails for good.
call() {
	deadline=""
	delay=20
	while :; do
		post "$2" "$3" && return 0
		rc=$?
		case "$status" in
		"" | 5??) ;;
		*) refused "$1" "$rc" ;;
		esac
		t=$(now)
		[ -n "$deadline" ] || deadline=$((t + retry_centis))
		[ "$t" -lt "$deadline" ] || refused "$1" "$rc"
		[ $((deadline - t)) -ge "$delay" ] || delay=$((deadline - t))
		pause=$((delay / 100)).$((delay % 100 / 10))$((delay % 10))
		if [ -n "$status" ]; then problem="HTTP $status"; else problem="no answer from $url"; fi
		printf 'outrunner-agent: %s: %s; retrying in %s s\n' "$1" "$problem" "$pause" >&2
		sleep "$pause" || die "cannot sleep"
		delay=$((delay * 2))
		[ "$delay" -le 200 ] || delay=200
	done
}

value() {
	printf '%s\n' "$answer" | sed -n "s/^$1=//p"
}

# Connect until the fake hands out a job: 200 with key=value lines. A 204 ("no job yet") is a
# success for wget without a body, so ask again; any error status makes wget fail.
# The fake hands this run its job again if the answer that carried it is lost (see
# outrunner.testing.fakegithub); any other run with the same JIT config gets 409.
session=$(cat /proc/sys/kernel/random/uuid 2>/dev/null) || session="pid-$$"
while :; do
	call connect /_agent/connect "wait=$poll&session=$session"
	job_id=$(value job_id)
	[ -z "$job_id" ] || break
	[ "$status" != 200 ] || die "connect answered 200 without a job"
done

duration=$(value duration)
result=$(value result)
display_name=$(value display_name)
printf 'Runner %s running job: %s\n' "$runner_name" "$display_name"

sleep "${duration:-0}" || die "cannot sleep '$duration'"

call complete /_agent/complete "job_id=$job_id&result=${result:-succeeded}"
printf 'Job %s completed with result: %s\n' "$display_name" "${result:-succeeded}"
