"""Shell-script analysis: what a POSIX sh / bash script can run, source or name, found with a parser.

`scan(script)` is the one entry point the minimizer follows (builder/minimize/rules.py keeps each command
found, resolved on the image's PATH, with its construct as the reason's detail). It parses the script
with tree-sitter-bash (an error-recovering parser: a script with syntax errors is still read, the regions
it could not parse are named in `Scan.problems`) and reports:

  commands   every command the script can run, as written (a name looked up on PATH, or a path), with
             the construct that runs it (`via`): plain commands in any position (pipelines, `&&`/`||`,
             `if`/`while`/`until`/`for`/`case` bodies, subshells, `{ }`, function bodies), inside `$(…)`,
             backticks (also in unquoted here-docs) and `<(…)`, after the builtins `exec`, `command`,
             `builtin`, `coproc`, `time`, and after the programs that run another program: `env [-i] [-u N]
             [VAR=…]`, `nice [-n N]`, `nohup`, `timeout [opts] DUR`, `chroot DIR`, `setpriv [opts]`,
             `gosu USER`, `su-exec USER`, `tini [opts] --`, `dumb-init [opts]`, `xargs [opts]` (`echo`
             when it names none), `find … -exec CMD … ;|+`, `runuser -u U --`, `stdbuf`, `numactl`,
             `taskset`, `ionice`, `chpst`, `s6-setuidgid`, `setsid`, `sudo`, `doas`, `flock`, `busybox`.
             The wrapper itself is a command too. Shell code in a string is parsed recursively:
             `sh|bash|dash|… -c STRING`, `su|runuser … -c STRING`, `flock … -c STRING`, `eval`, `trap`,
             and a here-doc fed to a shell; its expansions stand for unknown words. Names only looked up
             (`command -v`, `type`, `hash`, `which`) are commands with `lookup=True`: the script's
             behaviour depends on whether they exist.
  scripts    files read as shell code: `. FILE`, `source FILE`, `sh FILE`.
  dynamic    command words that are expansions (`$1`, `"$@"`, `$(which x)`, `${X:-ls}`): not guessed at.
             One exception, which is not a guess: a variable run as a command (`$cmd`, `"${runner[@]}"`)
             whose every assignment in the script is literal (`runner=( psql -v … )`, `cmd=ls`; not
             `for`, `read`, `x=$(…)`, and a variable the script never assigns comes from the
             environment) gives the first word of each assigned value as a command, via `"${runner[@]}"`.
             Only that first word: `cmd=( gosu app ); "${cmd[@]}" server` finds gosu, not server.
             Assignments through a computed name (`export "$var"=…`) are not followed.
  reexec     `"$0"` / `"$BASH_SOURCE"` in command position: the script runs itself again (after
             `exec gosu USER "$0" "$@"`), with its own interpreter.
  paths      absolute paths the script mentions (the literal start of a word, and words of here-doc
             bodies), globs kept as written.

A call of a function the script defines, and a builtin run as one (`echo`, `test`, `read`, …) are not
commands; the same names after `exec`, `env`, `xargs`, `find -exec`, … are, since those run programs.

Bounds (the script is untrusted): parsing and walking stop after `deadline` seconds of CPU time
(default 5), shell code nested in strings is followed `MAX_NESTING` levels deep, and each kind of
result is deduplicated; what was cut short is said in `problems`. Nothing here raises on any input.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

import tree_sitter
import tree_sitter_bash

LANGUAGE = tree_sitter.Language(tree_sitter_bash.language())
DEADLINE = 5.0  # CPU seconds for one scan, all nested code included
MAX_NESTING = 8  # levels of shell code inside strings (sh -c "sh -c '…'", eval, trap)
MAX_VIA = 6  # innermost constructs kept in `via`
MAX_PROBLEMS = 20
DYNAMIC = "${XBUILD_DYNAMIC}"  # what an expansion becomes in shell code taken from a string

SHELLS = frozenset({"sh", "bash", "dash", "ash", "ksh", "mksh", "zsh", "posh", "yash"})
# builtins of bash, dash and busybox ash: run as builtins where they stand first
BUILTINS = frozenset(
    {
        ":",
        ".",
        "[",
        "alias",
        "bg",
        "bind",
        "break",
        "builtin",
        "caller",
        "cd",
        "command",
        "compgen",
        "complete",
        "compopt",
        "continue",
        "declare",
        "dirs",
        "disown",
        "echo",
        "enable",
        "eval",
        "exec",
        "exit",
        "export",
        "false",
        "fc",
        "fg",
        "getopts",
        "hash",
        "help",
        "history",
        "jobs",
        "kill",
        "let",
        "local",
        "logout",
        "mapfile",
        "popd",
        "printf",
        "pushd",
        "pwd",
        "read",
        "readarray",
        "readonly",
        "return",
        "set",
        "shift",
        "shopt",
        "source",
        "suspend",
        "test",
        "times",
        "trap",
        "true",
        "type",
        "typeset",
        "ulimit",
        "umask",
        "unalias",
        "unset",
        "wait",
    }
)
ASSIGN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=")
VARREF = re.compile(r'"?\$(?:([A-Za-z_][A-Za-z0-9_]*)|\{([A-Za-z_][A-Za-z0-9_]*)(?:\[[@*0]\])?\})"?')
SELF = re.compile(r'"?\$(?:0|\{0\}|BASH_SOURCE|\{BASH_SOURCE(?:\[0\])?\})"?')
HEREDOC_PATH = re.compile(r"(?:(?<=[\s=:'\"(])|^)/[^\s'\"`;&|()<>$\\]*", re.M)
BACKTICK = re.compile(r"(?<!\\)`((?:[^`\\]|\\.)*)`", re.S)
WORDS = frozenset(
    {"word", "string", "raw_string", "concatenation", "ansi_c_string", "translated_string", "number"}
)
UNESCAPE = re.compile(r"\\(.)", re.S)
DQ_ESCAPE = re.compile(r"\\([$`\"\\\n])")
LEAVES = frozenset({"word", "number", "raw_string", "ansi_c_string", "string_content"})
SUBST = {"command_substitution": "$(…)", "process_substitution": "<(…)"}


@dataclass(frozen=True)
class Command:
    """A command word as written (a name or a path) and the construct that runs it, outermost first:
    ("exec", "gosu") for `exec gosu … NAME`, ("$(…)",), ("find -exec",), ("sh -c",). `line` is 1-based
    in the scanned text. `lookup` is True for a name only looked up (`command -v NAME`)."""

    name: str
    via: tuple[str, ...]
    line: int
    lookup: bool = False

    def construct(self) -> str:
        """How the script reaches it, e.g. `exec gosu`, `$(…) id`, `command -v gosu`; a word of shell code
        taken from a string that was an expansion there shows as `…`."""
        return " ".join((*self.via, self.name)).replace(DYNAMIC, "…")


@dataclass(frozen=True)
class Scan:
    """What one script can run (see the module docstring). Each tuple lists first occurrences, in
    the order the script has them."""

    commands: tuple[Command, ...]
    scripts: tuple[Command, ...]
    dynamic: tuple[Command, ...]
    reexec: tuple[Command, ...]
    paths: tuple[str, ...]
    problems: tuple[str, ...]


class _OutOfTime(Exception):
    pass


@dataclass(frozen=True)
class _Wrapper:
    """A program that runs the program named by its operands: the options that take a separate
    argument, how many operands come before the program, whether VAR=value words are skipped, and
    options after which it runs no program at all (`taskset -p`, `ionice -p`)."""

    arg_opts: frozenset[str] = frozenset()
    operands: int = 0
    assignments: bool = False
    no_command: frozenset[str] = frozenset()


def _w(opts: str = "", operands: int = 0, assignments: bool = False, no_command: str = "") -> _Wrapper:
    return _Wrapper(frozenset(opts.split()), operands, assignments, frozenset(no_command.split()))


WRAPPERS: dict[str, _Wrapper] = {
    "env": _w("-u --unset -C --chdir -S --split-string", assignments=True),
    "nice": _w("-n --adjustment"),
    "nohup": _w(),
    "timeout": _w("-s --signal -k --kill-after", operands=1),
    "chroot": _w("--userspec --groups", operands=1),
    "setpriv": _w(
        "--ruid --euid --reuid --rgid --egid --regid --groups --inh-caps --ambient-caps "
        "--bounding-set --securebits --pdeathsig --selinux-label --apparmor-profile "
        "--landlock-access --landlock-rule"
    ),
    "gosu": _w(operands=1),
    "su-exec": _w(operands=1),
    "s6-setuidgid": _w(operands=1),
    "tini": _w("-e -p"),
    "dumb-init": _w("-r --rewrite"),
    "stdbuf": _w("-i -o -e --input --output --error"),
    "numactl": _w(
        "-i --interleave -p --preferred -m --membind -N --cpunodebind -C --physcpubind "
        "-w --weighted-interleave -P --preferred-many"
    ),
    "taskset": _w(operands=1, no_command="-p --pid"),
    "ionice": _w("-c --class -n --classdata", no_command="-p --pid -P --pgid -u --uid"),
    "chpst": _w("-u -U -b -e -/ -n -l -L -m -d -o -p -f -c -r -t"),
    "runuser": _w("-u --user -g --group -G --supp-group -w --whitelist-environment -s --shell"),
    "setsid": _w(),
    "sudo": _w(
        "-u --user -g --group -C --close-from -D --chdir -h --host -p --prompt -r --role "
        "-t --type -T --command-timeout -U --other-user",
        assignments=True,
    ),
    "doas": _w("-u -C"),
    "flock": _w("-w --timeout -E --conflict-exit-code", operands=1),
    "time": _w("-f --format -o --output"),
    "xargs": _w(
        "-a --arg-file -d --delimiter -E -I -L --max-lines -n --max-args -P --max-procs "
        "-s --max-chars --process-slot-var"
    ),
    "busybox": _w(),
}
# options of a shell that take an argument; after them the first operand is the -c string or a file
SHELL_ARG_OPTS = frozenset({"-o", "+o", "-O", "+O", "--rcfile", "--init-file"})
SU_ARG_OPTS = frozenset(
    {
        "-c",
        "--command",
        "-s",
        "--shell",
        "-g",
        "--group",
        "-G",
        "--supp-group",
        "-w",
        "--whitelist-environment",
        "-u",
        "--user",
        "--session-command",
    }
)


def scan(script: bytes, *, inline: bool = False, deadline: float = DEADLINE) -> Scan:
    """Scan shell code. `inline` is True for code that is not a file of its own (`sh -c TEXT` from
    an image's command line): there `"$0"` is not the script. Never raises on any input."""
    s = _Scanner(time.process_time() + deadline)
    try:
        s.code(script, (), 0, inline=inline, depth=0)
    except _OutOfTime:
        s.problem(
            f"analysis stopped after {deadline:g} s of CPU time: commands after that point are not known"
        )
    return s.result()


def _short_cluster(word: str, arg_opts: frozenset[str]) -> bool:
    """For `-abc`: True when its last option letter takes the next word as its argument."""
    for i, ch in enumerate(word[1:], 1):
        if "-" + ch in arg_opts:
            return i == len(word) - 1
    return False


class _Scanner:
    def __init__(self, deadline: float):
        self.deadline = deadline
        self.commands: dict[tuple[str, tuple[str, ...], bool], Command] = {}
        self.direct: dict[tuple[str, tuple[str, ...], bool], bool] = {}  # named where a function may be
        self.functions: set[str] = set()
        self.scripts: dict[tuple[str, tuple[str, ...]], Command] = {}
        self.dynamic: dict[tuple[str, tuple[str, ...]], Command] = {}
        self.reexec: dict[tuple[str, ...], Command] = {}
        self.paths: dict[str, None] = {}
        self.problems: list[str] = []
        self.ticks = 0
        self.src = b""  # the code being walked (an eval string while it is scanned)
        # variable -> the first words of its literal assignments; None once any assignment is not literal
        self.assigned: dict[str, dict[str, None] | None] = {}
        self.pending: list[tuple[str, tuple[str, ...], int, str, str]] = []  # variables run as commands

    # -- results ---------------------------------------------------------------------------------
    def problem(self, text: str) -> None:
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(text)

    def result(self) -> Scan:
        for var, via, line, mode, text in self.pending:
            values = self.assigned.get(var)
            if values is None:
                self.dynamic.setdefault((text, via), Command(text, via, line))
                continue
            for value in values:
                if mode == "exec" or value not in BUILTINS:
                    self.command(value, (*via, text)[-MAX_VIA:], line, direct=mode == "direct")
        self.pending.clear()
        cmds = tuple(
            c for k, c in self.commands.items() if not (self.direct.get(k) and c.name in self.functions)
        )
        return Scan(
            cmds,
            tuple(self.scripts.values()),
            tuple(self.dynamic.values()),
            tuple(self.reexec.values()),
            tuple(self.paths),
            tuple(self.problems),
        )

    def command(self, name: str, via: tuple[str, ...], line: int, direct: bool, lookup: bool = False) -> None:
        key = (name, via, lookup)
        if key not in self.commands:
            self.commands[key] = Command(name, via, line, lookup)
            self.direct[key] = direct
        elif not direct:
            self.direct[key] = False

    def check_time(self) -> None:
        self.ticks += 1
        if self.ticks & 1023 == 0 and time.process_time() > self.deadline:
            raise _OutOfTime

    # -- parsing ---------------------------------------------------------------------------------
    def parse(self, data: bytes) -> tree_sitter.Tree:
        parser = tree_sitter.Parser(LANGUAGE)

        view = memoryview(data)

        def read(offset: int, _point: tree_sitter.Point) -> memoryview:
            return view[offset : offset + 65536]

        def cancel(_offset: int, _has_error: bool) -> bool:
            return time.process_time() > self.deadline

        try:
            return parser.parse(read, progress_callback=cancel)
        except ValueError:  # the parse was cancelled by `cancel`
            raise _OutOfTime from None

    def code(self, data: bytes, via: tuple[str, ...], line0: int, inline: bool, depth: int) -> None:
        """Scan shell code whose first line is line `line0 + 1` of the scanned file. A new shell (`sh
        -c`) gets its own functions: the caller passes a fresh scanner for it."""
        if depth > MAX_NESTING:
            self.problem(f"line {line0 + 1}: shell code nested deeper than {MAX_NESTING} levels is not read")
            return
        tree = self.parse(data)
        outer, self.src = self.src, data
        try:
            self.walk(tree.root_node, via, line0, inline, depth)
        finally:
            self.src = outer

    def string_code(
        self,
        node: tree_sitter.Node,
        via: tuple[str, ...],
        line0: int,
        inline: bool,
        depth: int,
        same_shell: bool,
    ) -> None:
        """A word that is shell code (`sh -c WORD`, `eval WORD`, `trap WORD SIG`): scanned with its
        expansions as unknown words; a word that is one expansion is itself an unknown command."""
        text = _value(node, self.src, DYNAMIC) or DYNAMIC
        if text == DYNAMIC:
            snippet = self.snippet(node)
            self.dynamic.setdefault((snippet, via), Command(snippet, via, line0 + node.start_point.row + 1))
        elif same_shell:
            self.code(
                text.encode("utf-8", "surrogateescape"), via, line0 + node.start_point.row, inline, depth + 1
            )
        else:
            self.subshell(
                text.encode("utf-8", "surrogateescape"), via, line0 + node.start_point.row, depth + 1
            )

    def subshell(self, data: bytes, via: tuple[str, ...], line0: int, depth: int) -> None:
        """Code run by a new shell process: functions of this script are not visible there."""
        inner = _Scanner(self.deadline)
        inner.ticks = self.ticks
        try:
            inner.code(data, via, line0, inline=True, depth=depth)
        finally:
            self.ticks = inner.ticks
            sub = inner.result()
            for c in sub.commands:
                self.command(c.name, c.via, c.line, False, c.lookup)
            for c in sub.scripts:
                self.scripts.setdefault((c.name, c.via), c)
            for c in sub.dynamic:
                self.dynamic.setdefault((c.name, c.via), c)
            for p in sub.paths:
                self.paths[p] = None
            for pr in sub.problems:
                self.problem(pr)

    # -- the tree --------------------------------------------------------------------------------
    def walk(
        self, root: tree_sitter.Node, via: tuple[str, ...], line0: int, inline: bool, depth: int
    ) -> None:
        data, errors = self.src, root.has_error
        stack: list[tuple[tree_sitter.Node, tuple[str, ...], bool]] = [(root, via, False)]
        while stack:
            self.check_time()
            node, v, in_word = stack.pop()
            t = node.type
            if t == "comment":
                continue
            if errors and (t == "ERROR" or node.is_missing):
                self.problem(
                    f"line {line0 + node.start_point.row + 1}: syntax error; commands there may be missed"
                )
            if t == "command":
                self.simple(node, v, line0, inline, depth)
            elif t == "function_definition":
                name = node.child_by_field_name("name")
                if name is not None:
                    self.functions.add(self.snippet(name))
            elif t == "variable_assignment":
                self.assignment(node)
            elif t == "for_statement":
                var = node.child_by_field_name("variable")
                if var is not None:
                    self.assigned[self.snippet(var)] = None
            elif t == "heredoc_body":
                self.heredoc(node, v, line0, inline, depth)
            elif t in WORDS and not in_word and data[node.start_byte : node.start_byte + 1] in b"/'\"$":
                p = _value(node, self.src, prefix=True)
                if p and p.startswith("/") and not p.startswith("//"):
                    self.paths[p.split(None, 1)[0]] = None
            if t in SUBST:
                label = SUBST[t] if data[node.start_byte : node.start_byte + 1] != b"`" else "`…`"
                v = (*v, label)[-MAX_VIA:]
                in_word = False
            elif t in WORDS:
                in_word = True
            if node.child_count:
                stack.extend((c, v, in_word) for c in reversed(node.children))

    def assignment(self, node: tree_sitter.Node) -> None:
        """`x=WORD`, `x=( WORD … )`, `x+=…`, `x[i]=…` (also under local/declare/export): the literal
        first word is a value the variable may hold; anything else makes the variable unknown."""
        name = node.child_by_field_name("name")
        if name is not None and name.type == "subscript":
            name = name.child_by_field_name("name")
        if name is None:
            return
        var = self.snippet(name)
        value = node.child_by_field_name("value")
        if value is not None and value.type == "array":
            elements = [c for c in value.children if c.type not in ("(", ")", "comment")]
            value = elements[0] if elements else None
        if value is None:
            return
        word = _value(value, self.src)
        known = self.assigned.setdefault(var, {})
        if word is None or known is None:
            self.assigned[var] = None
        elif word.split():
            known[word.split()[0]] = None

    def unknown_vars(self, vals: list[str | None], k: int, end: int) -> None:
        """`read x`, `mapfile x`, `getopts o x`, `printf -v x`: those variables hold unknown values."""
        for w in vals[k + 1 : end]:
            if w and ASSIGN.match(w + "="):
                self.assigned[w] = None

    def snippet(self, node: tree_sitter.Node, limit: int = 200) -> str:
        """The first `limit` bytes of a node's source text (a nested node's whole text is never copied)."""
        return self.src[node.start_byte : min(node.end_byte, node.start_byte + limit)].decode(
            "utf-8", "surrogateescape"
        )

    def heredoc(
        self, node: tree_sitter.Node, via: tuple[str, ...], line0: int, inline: bool, depth: int
    ) -> None:
        """Paths in a here-doc body; backticks in an unquoted one (tree-sitter leaves them as text);
        the body as code when a shell reads it."""
        body = self.src[node.start_byte : node.end_byte]
        text = body.decode("utf-8", "surrogateescape")
        for m in HEREDOC_PATH.finditer(text):
            self.paths[m.group(0)] = None
        redirect = node.parent
        start = next((c for c in redirect.children if c.type == "heredoc_start"), None) if redirect else None
        quoted = start is not None and any(q in self.src[start.start_byte : start.end_byte] for q in b"'\"\\")
        row = line0 + node.start_point.row
        if not quoted:
            for c in node.children:
                content = self.src[c.start_byte : c.end_byte]
                if c.type == "heredoc_content" and b"`" in content:
                    for m in BACKTICK.finditer(content.decode("utf-8", "surrogateescape")):
                        self.code(
                            m.group(1).encode("utf-8", "surrogateescape"),
                            (*via, "`…`")[-MAX_VIA:],
                            line0 + c.start_point.row,
                            inline,
                            depth + 1,
                        )
        stmt = redirect.parent if redirect is not None else None
        cmd = next((c for c in stmt.children if c.type == "command"), None) if stmt is not None else None
        if cmd is not None and self.reads_stdin_as_code(cmd):
            name = _base(_value(_name(cmd), self.src) or "")
            self.subshell(body, (*via, f"{name} <<")[-MAX_VIA:], row, depth + 1)

    def reads_stdin_as_code(self, cmd: tree_sitter.Node) -> bool:
        """`sh`, `bash -s`, `su USER` without a -c string or a script file: the shell reads stdin."""
        words = [_value(a, self.src) for a in cmd.children_by_field_name("argument")]
        base = _base(_value(_name(cmd), self.src) or "")
        if base in SHELLS:
            operands = [w for w in words if w is None or not w.startswith(("-", "+"))]
            return not operands or "-s" in words
        if base in ("su", "runuser"):
            return not any(w in ("-c", "--command", "-u", "--user") for w in words)
        return False

    # -- one simple command ----------------------------------------------------------------------
    def simple(
        self, node: tree_sitter.Node, via: tuple[str, ...], line0: int, inline: bool, depth: int
    ) -> None:
        name = _name(node)
        if name is None:
            return
        words = [name, *node.children_by_field_name("argument")]
        vals = [_value(w, self.src) for w in words]
        self.run(
            _Words(words, vals, len(words)),
            0,
            via,
            line0 + node.start_point.row + 1,
            line0,
            inline,
            depth,
            mode="direct",
        )

    def run(
        self,
        ws: _Words,
        k: int,
        via: tuple[str, ...],
        line: int,
        line0: int,
        inline: bool,
        depth: int,
        mode: str,
    ) -> None:
        """Words `ws[k:]` run as a command. `mode`: "direct" (as written in the script: functions and
        builtins first), "command" (after `command`: builtins, no functions), "builtin" (builtins only),
        "exec" (a program: after `exec` and every wrapper)."""
        vals = ws.vals
        while k < ws.end:
            self.check_time()
            v = vals[k]
            if v is None:
                text = self.snippet(ws.nodes[k])
                var = VARREF.fullmatch(text)
                if SELF.fullmatch(text) and not inline:
                    self.reexec.setdefault(via, Command(text, via, line))
                elif var:
                    self.pending.append((var.group(1) or var.group(2), via, line, mode, text))
                else:
                    self.dynamic.setdefault((text, via), Command(text, via, line))
                return
            base = _base(v)
            if v in ("read", "mapfile", "readarray", "getopts", "printf") and mode != "exec":
                self.unknown_vars(vals, k, ws.end)
            if mode != "exec" and v in BUILTINS or v in ("coproc", "time") and mode == "direct":
                nxt = self.builtin(v, ws, k, via, line, line0, inline, depth)
                if nxt is None:
                    return
                mode = {"command": "command", "builtin": "builtin", "exec": "exec"}.get(v, "direct")
                via, k = (*via, v)[-MAX_VIA:], nxt
                continue
            if mode == "builtin":
                return
            self.command(v, via, line, direct=mode == "direct")
            inner = (*via, base)[-MAX_VIA:]
            if base in SHELLS:
                self.shell(ws, k, inner, line, line0, depth)
                return
            if base in ("su", "runuser") and not {"-u", "--user"} & set(vals[k + 1 : ws.end]):
                self.su(ws, k, inner, line, line0, depth)
                return
            if base == "find":
                self.find(ws, k, via, line, line0, inline, depth)
                return
            if base == "which":
                self.lookups([w for w in vals[k + 1 : ws.end] if not (w or "-").startswith("-")], inner, line)
                return
            spec = WRAPPERS.get(base)
            if spec is None:
                return
            nxt = self.wrapped(spec, base, ws, k, via, line, line0, depth)
            if nxt is None:
                return
            if nxt >= ws.end and base == "xargs":
                self.command("echo", inner, line, direct=False)
            via, k, mode = inner, nxt, "exec"

    def builtin(
        self,
        v: str,
        ws: _Words,
        k: int,
        via: tuple[str, ...],
        line: int,
        line0: int,
        inline: bool,
        depth: int,
    ) -> int | None:
        """A builtin at `ws[k]`: the index of the words it runs as a command (after `exec`, `command`,
        `builtin`, `coproc`, `time`), or None when it runs none; code strings (`eval`, `trap`) and
        sourced files are scanned."""
        vals, end, i = ws.vals, ws.end, k + 1
        if v == "exec":
            while i < end and vals[i] in ("-c", "-l", "-cl", "-lc", "-a"):
                i += 2 if vals[i] == "-a" else 1
            return i
        if v == "command":
            lookup = False
            while i < end and (vals[i] or "").startswith("-") and vals[i] != "--":
                lookup = lookup or any(ch in (vals[i] or "") for ch in "vV")
                i += 1
            i += i < end and vals[i] == "--"
            if lookup:
                self.lookups(vals[i:end], (*via, "command -v")[-MAX_VIA:], line)
                return None
            return i
        if v in ("builtin", "coproc"):
            return i
        if v == "time":
            while i < end and vals[i] == "-p":
                i += 1
            return i
        if v in ("type", "hash"):
            self.lookups(
                [w for w in vals[i:end] if not (w or "-").startswith("-")], (*via, v)[-MAX_VIA:], line
            )
        elif v == "eval" and i + 1 == end:
            self.string_code(ws.nodes[i], (*via, "eval")[-MAX_VIA:], line0, inline, depth, same_shell=True)
        elif v == "eval" and i < end:
            text = " ".join(_value(w, self.src, DYNAMIC) or DYNAMIC for w in ws.nodes[i:end])
            self.code(
                text.encode("utf-8", "surrogateescape"),
                (*via, "eval")[-MAX_VIA:],
                ws.nodes[k].start_point.row + line0,
                inline,
                depth + 1,
            )
        elif v == "trap":
            while i < end and vals[i] in ("--", "-p", "-l"):
                i += 1
            if i + 1 < end and vals[i] != "-":
                self.string_code(
                    ws.nodes[i], (*via, "trap")[-MAX_VIA:], line0, inline, depth, same_shell=True
                )
        elif v in (".", "source") and i < end:
            self.script(ws, i, (*via, v)[-MAX_VIA:], line)
        return None

    def script(self, ws: _Words, i: int, via: tuple[str, ...], line: int) -> None:
        """`ws[i]` is a file read as shell code (`. FILE`, `sh FILE`)."""
        target = ws.vals[i]
        if target is None:
            text = self.snippet(ws.nodes[i])
            self.dynamic.setdefault((text, via), Command(text, via, line))
        else:
            self.scripts.setdefault((target, via), Command(target, via, line))

    def lookups(self, names: list[str | None], via: tuple[str, ...], line: int) -> None:
        for n in names:
            if n and n not in BUILTINS:
                self.command(n, via, line, direct=False, lookup=True)

    def wrapped(
        self,
        spec: _Wrapper,
        base: str,
        ws: _Words,
        k: int,
        via: tuple[str, ...],
        line: int,
        line0: int,
        depth: int,
    ) -> int | None:
        """The index of the program a wrapper at `ws[k]` runs (`ws.end` for none), or None when it runs
        none by design (`taskset -p`) or runs a string instead (`flock -c`, `env -S`)."""
        vals, end, i = ws.vals, ws.end, k + 1
        if base == "flock":  # `flock FILE -c STRING`: its options may follow the file
            for j in range(i, end - 1):
                if vals[j] in ("-c", "--command"):
                    self.string_code(
                        ws.nodes[j + 1], (*via, "flock -c")[-MAX_VIA:], line0, True, depth, same_shell=False
                    )
                    return None
        while i < end:
            w = vals[i]
            if w is None or not w.startswith("-") or w == "-":
                if spec.assignments and ASSIGN.match(_value(ws.nodes[i], self.src, prefix=True) or ""):
                    i += 1  # VAR=value, also VAR="$x"
                    continue
                break
            i += 1
            if w == "--":
                break
            opt = w.split("=", 1)[0]
            if opt in spec.no_command or (
                not w.startswith("--") and any("-" + ch in spec.no_command for ch in w[1:])
            ):
                return None
            if base == "env" and (opt == "--split-string" or w.startswith("-S")):
                arg: str | None = w.split("=", 1)[1] if "=" in w and w.startswith("--") else w[2:]
                if w in ("-S", "--split-string"):
                    arg, i = (vals[i] if i < end else None), i + 1
                text = " ".join(s or DYNAMIC for s in [arg, *vals[i:end]])
                self.subshell(
                    text.encode("utf-8", "surrogateescape"), (*via, "env -S")[-MAX_VIA:], line - 1, depth + 1
                )
                return None
            if "=" in w and w.startswith("--"):
                continue
            if opt in spec.arg_opts or (not w.startswith("--") and _short_cluster(w, spec.arg_opts)):
                i += 1
        if base == "flock" and i + 1 == end and (vals[i] or "").isdigit():
            return None  # flock FD: no program
        return i + spec.operands

    def shell(self, ws: _Words, k: int, via: tuple[str, ...], line: int, line0: int, depth: int) -> None:
        """`sh [opts] -c STRING [name args]` (the string scanned as a new shell) or `sh FILE`."""
        vals, end, i = ws.vals, ws.end, k + 1
        has_c = stdin = False
        while i < end:
            w = vals[i]
            if w is None or w in ("-", "--") or not w.startswith(("-", "+")):
                i += w in ("-", "--")
                break
            i += 1
            if w in SHELL_ARG_OPTS:
                i += 1
            elif not w.startswith("--"):
                has_c = has_c or "c" in w[1:]
                stdin = stdin or "s" in w[1:]
        if i >= end:
            return
        if has_c:
            self.string_code(ws.nodes[i], (*via[:-1], via[-1] + " -c"), line0, True, depth, same_shell=False)
        elif not stdin:
            self.script(ws, i, via, line)

    def su(self, ws: _Words, k: int, via: tuple[str, ...], line: int, line0: int, depth: int) -> None:
        """`su [opts] [-] [USER] -c STRING`, `runuser … -c STRING`: the string runs in the user's shell;
        `-s SHELL` names that shell (a command)."""
        vals = ws.vals
        label = (*via[:-1], via[-1] + " -c")
        for i in range(k + 1, ws.end):
            w, arg = vals[i], vals[i + 1] if i + 1 < ws.end else None
            if w in ("-s", "--shell") and arg:
                self.command(arg, via, line, direct=False)
            elif w in ("-c", "--command", "--session-command") and i + 1 < ws.end:
                self.string_code(ws.nodes[i + 1], label, line0, True, depth, same_shell=False)
            elif w and w.startswith("--shell="):
                self.command(w.split("=", 1)[1], via, line, direct=False)
            elif w and w.startswith(("--command=", "--session-command=")):
                self.subshell(
                    w.split("=", 1)[1].encode("utf-8", "surrogateescape"), label, line - 1, depth + 1
                )

    def find(
        self, ws: _Words, k: int, via: tuple[str, ...], line: int, line0: int, inline: bool, depth: int
    ) -> None:
        """`find … -exec CMD … ;` / `+` (also -execdir, -ok, -okdir), each clause a program."""
        vals, i = ws.vals, k + 1
        while i < ws.end:
            if vals[i] in ("-exec", "-execdir", "-ok", "-okdir"):
                j = i + 1
                while j < ws.end and vals[j] not in (";", "+"):
                    j += 1
                self.run(
                    _Words(ws.nodes, vals, j),
                    i + 1,
                    (*via, f"find {vals[i]}")[-MAX_VIA:],
                    line,
                    line0,
                    inline,
                    depth,
                    mode="exec",
                )
                i = j
            i += 1


@dataclass(frozen=True)
class _Words:
    """The words of one simple command (nodes and their literal values, None for an expansion); a
    command run by a wrapper is the slice from its index to `end`."""

    nodes: list[tree_sitter.Node]
    vals: list[str | None]
    end: int


def _name(command: tree_sitter.Node) -> tree_sitter.Node | None:
    """The word node of a simple command's name."""
    name = command.child_by_field_name("name")
    return name.children[0] if name is not None and name.children else name


def _base(word: str) -> str:
    return word.rsplit("/", 1)[-1]


def _unescape_dq(text: str) -> str:
    """Backslash inside double quotes escapes only $ ` " \\ and newline."""
    return DQ_ESCAPE.sub(lambda m: "" if m.group(1) == "\n" else m.group(1), text) if "\\" in text else text


def _ansi_c(text: str) -> str:
    escapes = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", "'": "'", '"': '"', "a": "\a", "e": "\x1b"}
    return re.sub(r"\\(.)", lambda m: escapes.get(m.group(1), "\\" + m.group(1)), text)


def _value(
    node: tree_sitter.Node | None, src: bytes, dynamic: str | None = None, prefix: bool = False
) -> str | None:
    """The word a node stands for after quote removal, when it is literal. An expansion makes it None,
    or stands as `dynamic` when given (shell code taken from a string); with `prefix` the literal text
    before the first expansion is returned instead. Iterative: a word nested 10^5 deep is no risk."""
    if node is None:
        return None
    out: list[str] = []
    stack = [node]
    while stack:
        n = stack.pop()
        t = n.type
        if t in ("string", "translated_string", "concatenation"):
            stack.extend(reversed([c for c in n.children if c.type not in ('"', '$"')]))
            continue
        text = src[n.start_byte : n.end_byte].decode("utf-8", "surrogateescape") if t in LEAVES else ""
        if t == "word":
            out.append(UNESCAPE.sub(r"\1", text.replace("\\\n", "")) if "\\" in text else text)
        elif t == "number":
            out.append(text)
        elif t == "raw_string":
            out.append(text[1:-1])
        elif t == "ansi_c_string":
            out.append(_ansi_c(text[2:-1]))
        elif t == "string_content":
            out.append(_unescape_dq(text))
        elif prefix:
            break
        elif dynamic is not None:
            out.append(dynamic)
        else:
            return None
    return "".join(out)
