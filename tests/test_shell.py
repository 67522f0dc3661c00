"""The shell analysis (builder/minimize/shell.py) finds every command a script can run.

- each construct of the issue, one script each (unit);
- entrypoint scripts written here with the constructs the official postgres, redis, mariadb and rabbitmq
  images' docker-entrypoint.sh use (functions called later, `exec gosu USER "$BASH_SOURCE" "$@"`,
  `find … -exec chown … +`, `eval '…'"$ARGS"'…'`, here-docs in functions, arrays as commands);
- against the real shells: generated scripts, composed of those constructs, run under dash and bash
  with every leaf command a recorder on PATH; every command that ran was found, and so was every
  command the script names (property);
- hostile input: deep nesting, huge scripts, binary garbage, unterminated quotes and here-docs, a
  parser-pathological input: a Scan within the CPU budget, never an exception; and through the real CLI
  (tests/fixtures/hostile.py's sandbox), an image whose entrypoint script is hostile builds, with the
  scan's limits as notes.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from builder.minimize.rules import SCRIPT_MAX
from builder.minimize.shell import Scan, scan
from tests.fixtures.hostile import Sandbox
from tests.fixtures.images import file, make_busybox_image


def found(script: str, **kw: object) -> set[str]:
    """The constructs (`exec gosu`, `$(…) id`) of the commands a script runs (not lookups)."""
    return {
        c.construct()
        for c in scan(textwrap.dedent(script).encode(), **kw).commands  # type: ignore[arg-type]
        if not c.lookup
    }


def names(s: Scan) -> set[str]:
    return {c.name for c in s.commands if not c.lookup}


# ---- one construct each -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "script, expected",
    [
        ('exec gosu postgres "$@"', {"exec gosu"}),
        ("exec su-exec app:app server", {"exec su-exec", "exec su-exec server"}),
        (
            "exec setpriv --reuid=999 --regid 999 --init-groups server",
            {"exec setpriv", "exec setpriv server"},
        ),
        ("exec tini -s -e 143 -- server", {"exec tini", "exec tini server"}),
        ("exec dumb-init --rewrite 15:3 -- server", {"exec dumb-init", "exec dumb-init server"}),
        ("exec env -i -u HOME A=b B=c server", {"exec env", "exec env server"}),
        ("nice -n 10 server", {"nice", "nice server"}),
        ("nice -10 server", {"nice", "nice server"}),
        ("nohup server &", {"nohup", "nohup server"}),
        ("timeout -s KILL -k 5 30 server", {"timeout", "timeout server"}),
        ("timeout --signal=TERM 30s server", {"timeout", "timeout server"}),
        ("chroot --userspec=1:1 /srv server", {"chroot", "chroot server"}),
        ("runuser -u app -- server --flag", {"runuser", "runuser server"}),
        ("stdbuf -oL -e0 server", {"stdbuf", "stdbuf server"}),
        ("numactl -N 0 --membind=0 --localalloc server", {"numactl", "numactl server"}),
        ("taskset -c 0-3 server", {"taskset", "taskset server"}),
        ("taskset 0x3 server", {"taskset", "taskset server"}),
        ("ionice -c 2 -n7 server", {"ionice", "ionice server"}),
        ("chpst -u app -/ /srv server", {"chpst", "chpst server"}),
        ("s6-setuidgid app server", {"s6-setuidgid", "s6-setuidgid server"}),
        ("sudo -u app VAR=1 server", {"sudo", "sudo server"}),
        ("setsid -f server", {"setsid", "setsid server"}),
        ("command server", {"command server"}),
        ("command -p server", {"command server"}),
        ("builtin exec server", {"builtin exec server"}),
        ("time server", {"time server"}),
        ("ls | xargs -0 -n1 -I{} cp {} /tmp", {"ls", "xargs", "xargs cp"}),
        ("ls | xargs", {"ls", "xargs", "xargs echo"}),
        ("find . ! -user app -exec chown app '{}' +", {"find", "find -exec chown"}),
        (r"find . -execdir rm {} \; -ok mv {} x ';'", {"find", "find -execdir rm", "find -ok mv"}),
        ('x="$(id -u)"', {"$(…) id"}),
        ("x=`hostname -s`", {"`…` hostname"}),
        ("a | b && c || d; e & f", {"a", "b", "c", "d", "e", "f"}),
        ("if a; then b; elif c; then d; else e; fi", {"a", "b", "c", "d", "e"}),
        ("while a; do b; done; until c; do d; done", {"a", "b", "c", "d"}),
        ('for f in 1 2; do a "$f"; done', {"a"}),
        ("case $1 in x) a ;; y|z) b ;; *) c ;; esac", {"a", "b", "c"}),
        ("( a; b ) && { c; }", {"a", "b", "c"}),
        ("! a", {"a"}),
        ("diff <(a) >(b)", {"diff", "<(…) a", "<(…) b"}),
        ("sh -c 'exec redis-server \"$@\"' sh --port 1", {"sh", "sh -c exec redis-server"}),
        ('bash -ec "a; \\$(b)"', {"bash", "bash -c a", "bash -c $(…) b"}),
        ("bash -o pipefail -c 'a | b'", {"bash", "bash -c a", "bash -c b"}),
        ("sh -c \"sh -c 'inner'\"", {"sh", "sh -c sh", "sh -c sh -c inner"}),
        ("su postgres -c 'pg_ctl start'", {"su", "su -c pg_ctl"}),
        ("su -s /bin/bash app -c 'a'", {"su", "su /bin/bash", "su -c a"}),
        ("flock /run/x -c 'a b'", {"flock", "flock -c a"}),
        ("flock -w 5 /run/x a", {"flock", "flock a"}),
        ("env -S 'a -x' b", {"env", "env -S a"}),
        ("eval 'a --x'", {"eval a"}),
        ('eval \'initdb --user="$U" \'"$ARGS"\' "$@"\'', {"eval initdb"}),
        ("trap 'cleanup --now' EXIT", {"trap cleanup"}),
        ("coproc a", {"coproc a"}),
        ("FOO=1 BAR=$(a) b >/dev/null 2>&1", {"$(…) a", "b"}),
        ("busybox sed -i s/a/b/ f", {"busybox", "busybox sed"}),
        ("/usr/local/bin/server --x", {"/usr/local/bin/server"}),
        ("'quo'\"ted\" x; \\esc y", {"quoted", "esc"}),
        ("exec 3>&1 >&2", set()),
        ("echo a; printf b; test -x c; [ -d d ]; read x; cd /; true; : ok", set()),
    ],
)
def test_construct(script: str, expected: set[str]) -> None:
    assert found(script) == expected


def test_builtin_names_are_programs_after_a_wrapper() -> None:
    assert found("env echo a; xargs printf b; exec kill 1; find . -exec test -f {} ';'") >= {
        "env echo",
        "xargs printf",
        "exec kill",
        "find -exec test",
    }
    assert found("command echo x") == set()


def test_functions_are_not_commands_but_their_bodies_are() -> None:
    s = scan(b'run_sql() { psql -v x "$@"; }\nmain() { run_sql -f x; exec gosu pg "$0" "$@"; }\nmain "$@"\n')
    assert names(s) == {"psql", "gosu"}
    assert [c.construct() for c in s.reexec] == ['exec gosu "$0"']
    # a function's name after exec/env is a program, not the function
    assert "env run_sql" in found("run_sql() { :; }\nenv run_sql\n")


def test_lookups() -> None:
    s = scan(b"if command -v gosu >/dev/null; then :; fi; type -P tini; hash su-exec; which dumb-init\n")
    assert {c.construct() for c in s.commands if c.lookup} == {
        "command -v gosu",
        "type tini",
        "hash su-exec",
        "which dumb-init",
    }
    assert found("which x") == {"which"}


def test_dynamic_names_are_reported_not_guessed() -> None:
    s = scan(b'$cmd x\n"${runner[@]}" "$@"\nexec "$@"\n${X:-ls}\n$(which python3) -m x\n. "$f"\n$1\n')
    assert names(s) == {"which"}
    assert {c.construct() for c in s.dynamic} == {
        "$cmd",
        '"${runner[@]}"',
        'exec "$@"',
        "${X:-ls}",
        "$(which python3)",
        '. "$f"',
        "$1",
    }


def test_variables_with_only_literal_values() -> None:
    s = scan(
        b'f() { local r=( psql -v 1 ); PGHOST= "${r[@]}" "$@"; }\nf\nx=ls; $x\nx=cat; exec $x\n'
        b'w=( helper_fn ); helper_fn() { :; }; "${w[@]}"\ne=echo; $e\n'
    )
    assert {c.construct() for c in s.commands} == {
        '"${r[@]}" psql',
        "$x ls",
        "$x cat",
        "exec $x ls",
        "exec $x cat",
    }
    assert not s.dynamic
    # one assignment that is not literal, a loop variable, read: unknown
    s = scan(b"y=a; y=$(b); $y\nfor z in a; do $z; done\nread -r q; $q\nprintf -v p x; $p\n")
    assert {c.construct() for c in s.dynamic} == {"$y", "$z", "$q", "$p"}
    assert names(s) == {"b"}


def test_self_reexec() -> None:
    for word in ('"$0"', '"$BASH_SOURCE"', '"${BASH_SOURCE[0]}"', "$0"):
        s = scan(f'exec setpriv --reuid=1 --regid=1 --clear-groups {word} "$@"\n'.encode())
        assert [c.construct() for c in s.reexec] == [f"exec setpriv {word}"]
        assert not s.dynamic
    # in `sh -c` text from a command line, $0 is not a script
    assert not scan(b'exec "$0"', inline=True).reexec


def test_heredocs_are_not_commands() -> None:
    s = scan(
        textwrap.dedent("""\
        f() {
        \tpsql <<-'EOSQL'
        \t\tSELECT 1; rm -rf /; $(not_run) `not_run`
        \tEOSQL
        }
        cat <<EOF
        $(run_a) `run_b` \\`not_run\\` /etc/app.conf
        EOF
        sh <<'EOF'
        run_c /opt/x
        EOF
        mysql <<<"GRANT \\`x\\`"
        """).encode()
    )
    assert names(s) == {"psql", "cat", "run_a", "run_b", "sh", "run_c", "mysql"}
    assert {"/etc/app.conf", "/opt/x"} <= set(s.paths)


def test_sourced_and_interpreted_files() -> None:
    s = scan(b". /usr/local/lib/lib.sh\nsource ./rel.sh\nsh /docker-entrypoint.d/20.sh\nbash -x b.sh\n")
    assert {c.construct() for c in s.scripts} == {
        ". /usr/local/lib/lib.sh",
        "source ./rel.sh",
        "sh /docker-entrypoint.d/20.sh",
        "bash b.sh",
    }


def test_paths() -> None:
    s = scan(
        b'cd /srv; for f in /docker-entrypoint.d/*.sh; do :; done; x="/etc/a.conf"; y="$HOME/z"\n'
        b"cat /etc/b.conf 2>/dev/null  # /not/in/a/comment\n"
    )
    assert set(s.paths) == {"/srv", "/docker-entrypoint.d/*.sh", "/etc/a.conf", "/etc/b.conf", "/dev/null"}


def test_syntax_errors_are_named_and_the_rest_is_read() -> None:
    s = scan(b"a\nif then fi fi )\nb\n")
    assert {"a", "b"} <= names(s)
    assert s.problems and "syntax error" in s.problems[0]


# ---- entrypoints with the official images' constructs -----------------------------------------------

POSTGRES_LIKE = r"""#!/usr/bin/env bash
set -Eeo pipefail
file_env() {
	local var="$1" fileVar="${1}_FILE" def="${2:-}" val
	if [ "${!fileVar:-}" ]; then val="$(< "${!fileVar}")"; fi
	export "$var"="${val:-$def}"
}
run_sql() {
	local runner=( psql -v ON_ERROR_STOP=1 --no-psqlrc )
	PGHOST= "${runner[@]}" "$@"
}
init_dir() {
	local uid; uid="$(id -u)"
	if ! getent passwd "$uid" &> /dev/null; then
		for w in {/usr,}/lib{/*,}/libnss_wrapper.so; do
			[ -s "$w" ] && export LD_PRELOAD="$w" NSS_WRAPPER_PASSWD="$(mktemp)" && break
		done
	fi
	eval 'initdb --username="$PGUSER" --pwfile=<(printf "%s\n" "$PW") '"$INITDB_ARGS"' "$@"'
}
process_files() {
	local f
	for f; do
		case "$f" in
			*.sh) if [ -x "$f" ]; then "$f"; else . "$f"; fi ;;
			*.sql.gz) gunzip -c "$f" | run_sql ;;
			*.sql.zst) zstd -dc "$f" | run_sql ;;
		esac
	done
}
start_temp() {
	set -- "$@" -c listen_addresses='' -p "${PGPORT:-5432}"
	NOTIFY_SOCKET= pg_ctl -D "$PGDATA" -o "$(printf '%q ' "$@")" -w start
}
_main() {
	if [ "${1:0:1}" = '-' ]; then set -- postgres "$@"; fi
	if [ "$1" = 'postgres' ]; then
		file_env PGPASSWORD
		mkdir -p "$PGDATA" && chmod 00700 "$PGDATA" || :
		if [ "$(id -u)" = '0' ]; then
			find "$PGDATA" \! -user postgres -exec chown postgres '{}' +
			exec gosu postgres "$BASH_SOURCE" "$@"
		fi
		if [[ -z "${DONE:-}" ]] && mountpoint -q /var/lib/postgresql/data; then
			init_dir
			start_temp "$@"
			run_sql --dbname postgres <<-'EOSQL'
				CREATE DATABASE x;
			EOSQL
			process_files /docker-entrypoint-initdb.d/*
			pg_ctl -D "$PGDATA" -m fast -w stop
			cat <<-'EOM'
				init process complete
			EOM
		fi
	fi
	exec "$@"
}
if ! [ "${FUNCNAME[0]:-}" = source ]; then _main "$@"; fi
"""

REDIS_LIKE = r"""#!/bin/sh
set -e
if [ "${1#-}" != "$1" ] || [ "${1%.conf}" != "$1" ]; then
	set -- redis-server "$@"
fi
if [ "$1" = 'redis-server' -a "$(id -u)" = '0' ]; then
	find . \! -user redis -exec chown redis '{}' +
	exec gosu redis "$0" "$@"
fi
um="$(umask)"
[ "$um" = '0022' ] && umask 0077
exec "$@"
"""

MARIADB_LIKE = r"""#!/bin/bash
set -eo pipefail
note() { printf '%s [Note] %s\n' "$(date --rfc-3339=seconds)" "$*"; }
check_config() {
	local toRun=( "$@" --verbose --help ) errors
	if ! errors="$("${toRun[@]}" 2>&1 >/dev/null)"; then note "$errors"; exit 1; fi
}
setup_db() {
	{
		mysql_tzinfo_to_sql /usr/share/zoneinfo | sed 's/Local time zone/FCTY/'
	} | mysql --database=mysql
	PW="$(pwgen --numerals --capitalize -1 32)"
	mysql --database=mysql <<<"CREATE DATABASE IF NOT EXISTS \`$DB\` ;"
	"$@" --skip-networking --socket="$SOCKET" &
	for i in {30..0}; do
		if mysqladmin ping --socket="$SOCKET" &>/dev/null; then break; fi
		sleep 1
	done
}
if [ "$(id -u)" = "0" ]; then
	find "$DATADIR" \! -user mysql -exec chown mysql '{}' +
	find "${SOCKET%/*}" -maxdepth 0 \! -user mysql -exec chown mysql '{}' \;
	exec gosu mysql "$BASH_SOURCE" "$@"
fi
mysql_install_db --datadir="$DATADIR" "${@:2}"
setup_db "$@"
exec "$@"
"""

RABBITMQ_LIKE = r"""#!/usr/bin/env bash
set -euo pipefail
if [[ "$1" == rabbitmq* ]] && [ "$(id -u)" = '0' ]; then
	if [ "$1" = 'rabbitmq-server' ]; then
		find /var/lib/rabbitmq \! -user rabbitmq -exec chown rabbitmq '{}' +
	fi
	exec gosu rabbitmq "$BASH_SOURCE" "$@"
fi
if [ -z "${RABBITMQ_USE_LONGNAME:-}" ] && [ "$(hostname)" != "$(hostname -s)" ]; then
	export RABBITMQ_USE_LONGNAME=true
fi
exec "$@"
"""


@pytest.mark.parametrize(
    "script, commands, reexec",
    [
        (
            POSTGRES_LIKE,
            {
                "id",
                "getent",
                "mktemp",
                "initdb",
                "gunzip",
                "zstd",
                "psql",
                "pg_ctl",
                "mkdir",
                "chmod",
                "find",
                "chown",
                "gosu",
                "mountpoint",
                "cat",
            },
            ['exec gosu "$BASH_SOURCE"'],
        ),
        (REDIS_LIKE, {"id", "find", "chown", "gosu"}, ['exec gosu "$0"']),
        (
            MARIADB_LIKE,
            {
                "date",
                "mysql_tzinfo_to_sql",
                "sed",
                "mysql",
                "pwgen",
                "mysqladmin",
                "sleep",
                "id",
                "find",
                "chown",
                "gosu",
                "mysql_install_db",
            },
            ['exec gosu "$BASH_SOURCE"'],
        ),
        (RABBITMQ_LIKE, {"id", "find", "chown", "gosu", "hostname"}, ['exec gosu "$BASH_SOURCE"']),
    ],
    ids=["postgres", "redis", "mariadb", "rabbitmq"],
)
def test_official_entrypoint_constructs(script: str, commands: set[str], reexec: list[str]) -> None:
    s = scan(script.encode())
    assert names(s) == commands
    assert [c.construct() for c in s.reexec] == reexec
    assert any(c.name == '"$@"' and c.via == ("exec",) for c in s.dynamic)  # exec "$@": Cmd, not guessed
    assert not s.problems
    gosu = next(c for c in s.commands if c.name == "gosu")
    assert gosu.construct() == "exec gosu"
    assert script.splitlines()[gosu.line - 1].strip().startswith("exec gosu")


# ---- against the real shells ------------------------------------------------------------------------

LEAVES = [f"leaf{i}" for i in range(8)]
# (template, the real program on the host it needs); {} is the inner command
WRAPPERS = [
    ('env -i PATH="$PATH" A=b {}', "env"),
    ("env -u HOME {}", "env"),
    ("nice -n 5 {}", "nice"),
    ("timeout -s KILL -k 5 20 {}", "timeout"),
    ("stdbuf -oL {}", "stdbuf"),
    ("taskset -c 0 {}", "taskset"),
    ("ionice -c 3 {}", "ionice"),
    ("chroot / {}", "chroot"),
    ("setpriv --reuid=0 --regid 0 --keep-groups {}", "setpriv"),
    ("runuser -u root -- {}", "runuser"),
    ("tini -s -- {}", "tini"),
    ("xargs -0 {} < /dev/null", "xargs"),
    ("find / -maxdepth 0 -exec {} ';'", "find"),
]


def leaf_strategy() -> st.SearchStrategy[str]:
    return st.sampled_from(LEAVES)


def wrap(inner: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """A simple command run by a wrapper (a wrapper runs a simple command, never `{ …; }` or `for`)."""
    return st.tuples(st.sampled_from([w for w, _ in WRAPPERS]), inner).map(lambda t: t[0].replace("{}", t[1]))


def compose(inner: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    two = st.tuples(inner, inner)
    return st.one_of(
        two.map(lambda t: f"{t[0]} && {t[1]}"),
        two.map(lambda t: f"{t[0]} || {t[1]}"),
        two.map(lambda t: f"{t[0]} | {t[1]}"),
        two.map(lambda t: f"{t[0]}; {t[1]}"),
        inner.map(lambda a: f'x="$( {a} )"'),
        inner.map(lambda a: f"x=`{a}`" if "`" not in a else f"x=$( {a} )"),
        two.map(lambda t: f"if {t[0]}; then {t[1]}; fi"),
        two.map(lambda t: f"while {t[0]}; do {t[1]}; break; done"),
        inner.map(lambda a: f"for i in 1; do {a}; done"),
        inner.map(lambda a: f"case x in x) {a} ;; esac"),
        inner.map(lambda a: f"( {a} )"),
        inner.map(lambda a: f"{{ {a}; }}"),
        inner.map(lambda a: f"fn_{abs(hash(a)) % 1000}() {{ {a}; }}; fn_{abs(hash(a)) % 1000}"),
        inner.map(lambda a: f"sh -c {shlex.quote(a)}"),
        inner.map(lambda a: f"eval {shlex.quote(a)}"),
    )


SIMPLE = st.recursive(leaf_strategy(), wrap, max_leaves=3).flatmap(  # `command` is a builtin: first only
    lambda c: st.sampled_from([c, f"command {c}", f"exec {c}"])
)
SCRIPTS = st.recursive(SIMPLE, compose, max_leaves=6)


@pytest.fixture(scope="module")
def recorders(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bin directory whose leaf commands append their name to $LOG and exit 0."""
    missing = [
        p
        for _, p in WRAPPERS
        if not any(os.access(os.path.join(d, p), os.X_OK) for d in os.environ.get("PATH", "").split(":"))
    ]
    if missing:
        pytest.skip(f"not installed on this host: {missing}")
    bin_dir = tmp_path_factory.mktemp("recorders")
    for name in LEAVES:
        f = bin_dir / name
        f.write_text(f'#!/bin/sh\necho {name} >> "$LOG"\n')
        f.chmod(0o755)
    return bin_dir


@pytest.mark.skipif(os.geteuid() != 0, reason="chroot / runuser / setpriv need root")
@settings(
    max_examples=40, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(body=SCRIPTS)
def test_every_command_the_real_shells_run_is_found(body: str, recorders: Path, tmp_path: Path) -> None:
    s = scan(body.encode())
    assert not s.problems, (body, s.problems)
    named = names(s)
    assert {leaf for leaf in LEAVES if leaf in body} <= named, body
    for shell in ("/bin/dash", "/bin/bash"):
        log = tmp_path / f"{Path(shell).name}.log"
        log.unlink(missing_ok=True)
        env = {"PATH": f"{recorders}:/usr/sbin:/usr/bin:/sbin:/bin", "LOG": str(log), "HOME": str(tmp_path)}
        subprocess.run(
            [shell, "-c", body],
            env=env,
            cwd=tmp_path,
            timeout=60,
            capture_output=True,
            stdin=subprocess.DEVNULL,
        )
        ran = set(log.read_text().split()) if log.exists() else set()
        assert ran <= named, (shell, body, ran - named)


# ---- hostile input ----------------------------------------------------------------------------------

N = 20000
HOSTILE = {
    "nested $(": b"echo " + b"$(" * N + b"x" + b")" * N,
    "unterminated $(": b"echo " + b"$(" * N,
    "nested if": b"if a; then\n" * 5000 + b"b\n" + b"fi\n" * 5000,
    "nested subshells": b"(" * N + b"a" + b")" * N,
    "nested braces": b"{ " * N + b"a;" + b"}" * N,
    "backticks": b"`" * N,
    "unterminated single quote": b"a 'b\n" + b"x" * (1 << 20),
    "unterminated double quote": b'a "b $(c\n' + b"x" * (1 << 20),
    "unterminated heredoc": b"cat <<EOF\n" + b"a\n" * 100000,
    "garbage": bytes(((i * 2654435761) >> 13) & 0xFF for i in range(1 << 20)),
    "huge": b"ls -l /etc/foo && cat x | grep y\n" * 30000,
    "nested sh -c": b"sh -c " + b"'sh -c " * 200 + b"x",
    "nested eval": b"eval 'eval " * 1000,
    "many wrappers": b"exec " + b"nice " * 50000 + b"ls",
    "nested arrays (slow for the parser)": b"a=(" * 20000,
}


@pytest.mark.parametrize("data", HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_scripts_are_bounded(data: bytes) -> None:
    t0 = time.process_time()
    s = scan(data, deadline=2.0)
    used = time.process_time() - t0
    assert isinstance(s, Scan)
    assert used < 2.0 + 1.0, used  # the budget, plus what one check interval may overrun


def test_the_cpu_budget_stops_a_slow_parse() -> None:
    s = scan(b"a=(" * 20000, deadline=0.3)
    assert s.problems == (
        "analysis stopped after 0.3 s of CPU time: commands after that point are not known",
    )


def test_hostile_memory_is_bounded() -> None:
    """Scanning 1 MiB of each hostile kind stays within 512 MiB of address space (a child process)."""
    code = textwrap.dedent("""
        import resource, sys
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
        from builder.minimize.shell import scan
        from tests.test_shell import HOSTILE
        for data in HOSTILE.values():
            scan(data, deadline=2.0)
        # VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec from the forking parent (pytest)
        hwm = next(ln for ln in open("/proc/self/status") if ln.startswith("VmHWM:"))
        print(int(hwm.split()[1]) // 1024)
    """)
    r = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=Path(__file__).parent.parent,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert int(r.stdout.split()[-1]) < 512, r.stdout


@settings(max_examples=200, deadline=None, database=None)
@given(
    data=st.binary(max_size=4096)
    | st.text(alphabet="$(){}[]`'\"\\;|&<>!#= \nabcexgosu-0", max_size=400).map(str.encode)
)
def test_any_bytes_give_a_scan(data: bytes) -> None:
    assert isinstance(scan(data, deadline=1.0), Scan)


@pytest.mark.parametrize(
    "name", ["nested arrays (slow for the parser)", "garbage", "nested $(", "unterminated double quote"]
)
def test_hostile_entrypoint_script_through_the_cli(name: str, sandbox: Sandbox) -> None:
    """The real CLI builds an image whose entrypoint script is hostile: exit 0, no traceback, the scan's
    limits are notes in the report, nothing left in TMPDIR; the script's own bytes stay the script."""
    script = b"#!/bin/sh\n" + HOSTILE[name][: SCRIPT_MAX - 10]
    img = make_busybox_image(
        sandbox.root / "layout",
        config_overrides={"Entrypoint": ["/entry.sh"]},
        extra_layers=[[file("entry.sh", script, mode=0o755)]],
    )
    t0 = time.monotonic()
    r = sandbox.xbuild(img.ref, "-o", str(sandbox.out), "--kernel", "none", "--json")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert time.monotonic() - t0 < 120
    report = json.loads(r.stdout)["minimize"]
    assert report["paths"]["/entry.sh"][:2] == ["kept", "entrypoint"]
    if name.startswith("nested arrays"):
        assert any("analysis stopped after 5 s of CPU time" in n for n in report["notes"]), report["notes"]
    assert sandbox.stale_temps() == []
