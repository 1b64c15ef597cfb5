#!/usr/bin/env bash
# Find or build Autobahn|Testsuite's `wstest` and print its path on stdout.
#
# wstest runs on Python 2.7 only, so it lives in a virtualenv of its own, cached
# under .tools/wstest/ and rebuilt when the pins below change. Order of choice:
#   1. $WSTEST, if set (a path to a working wstest);
#   2. the cached virtualenv, if it was built from the current pins;
#   3. a `wstest` already on PATH;
#   4. a new virtualenv, built with the first Python 2.7 of: $WSTEST_PYTHON,
#      `python2.7` on PATH, pyenv's ~/.pyenv/versions/2.7.*.
# Progress goes to stderr; building needs a C compiler and Python 2.7 headers
# (wsaccel and ujson are compiled).
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
cache="${WSTEST_CACHE:-$root/.tools/wstest}"
env_dir="$cache/env"

# The set the suite's maintainers pin for autobahntestsuite 25.10.1 (Autobahn
# 0.10.9 on Twisted 19.10), with every transitive dependency pinned as well.
pins='autobahntestsuite==25.10.1
autobahn[accelerate,twisted]==0.10.9
txaio==2.1.0
Twisted==19.10.0
zope.interface==4.6.0
incremental==16.10.1
constantly==15.1.0
Automat==22.10.0
attrs==21.4.0
hyperlink==21.0.0
idna==2.10
PyHamcrest==1.10.1
typing==3.10.0.0
pyOpenSSL==19.1.0
cryptography==3.3.2
cffi==1.15.1
pycparser==2.21
enum34==1.1.10
ipaddress==1.0.23
service-identity==18.1.0
pyasn1==0.5.1
pyasn1-modules==0.3.0
six==1.16.0
klein==17.10.0
Werkzeug==1.0.1
Jinja2==2.11.3
MarkupSafe==1.1.1
unittest2==1.1.0
argparse==1.4.0
linecache2==1.0.0
traceback2==1.4.0
wsaccel==0.6.6
ujson==2.0.3
setuptools==44.0.0'
bootstrap_pin='virtualenv==20.15.1'

say() { printf 'wstest-env: %s\n' "$*" >&2; }

works() {  # works WSTEST: it starts and names its version
    "$1" --autobahnversion 2>/dev/null | grep -q AutobahnTestSuite
}

if [[ -n "${WSTEST:-}" ]]; then
    works "$WSTEST" || { say "\$WSTEST=$WSTEST does not run"; exit 1; }
    printf '%s\n' "$WSTEST"
    exit 0
fi

stamp="$(printf '%s\n%s\n' "$bootstrap_pin" "$pins" | sha256sum | cut -c1-16)"
if [[ -f "$env_dir/.pins" && "$(cat "$env_dir/.pins")" == "$stamp" ]] && works "$env_dir/bin/wstest"; then
    printf '%s\n' "$env_dir/bin/wstest"
    exit 0
fi

if [[ -z "${WSTEST_PYTHON:-}" ]] && on_path="$(command -v wstest)" && works "$on_path"; then
    printf '%s\n' "$on_path"
    exit 0
fi

is_py27() {  # is_py27 PYTHON: it runs and is 2.7 (pyenv shims may exist but not run)
    "$1" -c 'import sys; sys.exit(sys.version_info[:2] != (2, 7))' >/dev/null 2>&1
}

python=""
candidates=()
[[ -n "${WSTEST_PYTHON:-}" ]] && candidates+=("$WSTEST_PYTHON")
command -v python2.7 >/dev/null 2>&1 && candidates+=("$(command -v python2.7)")
for found in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/2.7.*/bin/python2.7; do
    [[ -x "$found" ]] && candidates+=("$found")
done
for candidate in ${candidates[@]+"${candidates[@]}"}; do
    if is_py27 "$candidate"; then
        python="$candidate"
        break
    fi
done
if [[ -z "$python" ]]; then
    say "no Python 2.7 found (set WSTEST_PYTHON, or see docs/conformance.md for the Docker image)"
    exit 1
fi

mkdir -p "$cache"
log="$cache/install.log"
say "building $env_dir with $python (log: $log)"
# One builder at a time; a second caller waits and then reuses the result.
exec 9>"$cache/.lock"
flock 9
if [[ -f "$env_dir/.pins" && "$(cat "$env_dir/.pins")" == "$stamp" ]] && works "$env_dir/bin/wstest"; then
    printf '%s\n' "$env_dir/bin/wstest"
    exit 0
fi
rm -rf "$env_dir" "$cache/bootstrap"
: >"$log"
{
    # A plain `pip install --target` of the suite breaks its zope namespace
    # imports, so only virtualenv goes there, and the suite into a real env.
    "$python" -m pip install --disable-pip-version-check --no-warn-script-location \
        --target "$cache/bootstrap" "$bootstrap_pin" &&
    PYTHONPATH="$cache/bootstrap" "$python" -m virtualenv --no-periodic-update "$env_dir" &&
    printf '%s\n' "$pins" >"$cache/requirements.txt" &&
    "$env_dir/bin/python" -m pip install --disable-pip-version-check -r "$cache/requirements.txt"
} >>"$log" 2>&1 || {
    say "building failed; the end of $log:"
    tail -n 20 "$log" >&2
    exit 1
}
works "$env_dir/bin/wstest" || { say "the new wstest does not run; see $log"; exit 1; }
printf '%s\n' "$stamp" >"$env_dir/.pins"
say "ready: $("$env_dir/bin/wstest" --autobahnversion 2>/dev/null | tr '\n' ' ')"
printf '%s\n' "$env_dir/bin/wstest"
