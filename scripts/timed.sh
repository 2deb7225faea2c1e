#!/usr/bin/env bash
# scripts/timed.sh LABEL CMD...: runs CMD, then prints and appends to
# target/times.log how long it took and whether it passed; exits as CMD did.
label=$1
shift
start=$(date +%s)
rc=0
"$@" || rc=$?
secs=$(($(date +%s) - start))
line=$(printf '%-36s %4d min %02d s  %s' "$label" $((secs / 60)) $((secs % 60)) "$([ $rc -eq 0 ] && echo ok || echo "FAILED ($rc)")")
mkdir -p "$(dirname "$0")/../target"
echo "$line" >>"$(dirname "$0")/../target/times.log"
printf '\033[1m[time]\033[0m %s\n' "$line"
exit $rc
