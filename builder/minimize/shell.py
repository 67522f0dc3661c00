"""Shell-script analysis: what a script (or the text of `sh -c TEXT`) may run, source or name.

`uses(text)` is the one entry point; it yields, in script order, the words the minimizer follows:

  Use("path", WORD)     a word that is an absolute path, wherever it stands (argument, redirection...);
  Use("command", WORD)  the word in command position of a simple command, after leading assignments
                        (FOO=bar) and prefix words that run their argument (exec, env, nohup, sudo, if,
                        then, ...), when it can name a program: not a builtin or keyword, no $ or `;
  Use("source", WORD)   the word after `.` / `source`.

A word that is both a path and a command or sourced file gives its "path" use first (the minimizer keeps
the first reason that reaches a file, so the order shows in the report's details). Words have their
surrounding quotes stripped and are otherwise literal (no expansion). The minimizer resolves them in the
image (commands on PATH, paths and sourced files as tree paths); this module knows only shell syntax.
Today this is a tokenizer, not a parser: comments are dropped line by line, and operators
(; & | && || ( ) { } $( ` ;; newline) end a simple command.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

SHELLS = {"sh", "bash", "dash", "ash", "ksh", "mksh", "zsh", "busybox"}
BUILTINS = {"echo", "printf", "test", "[", "[[", "cd", "set", "export", "exit", "return", "shift",
            "read", "local", "eval", "trap", "wait", "true", "false", ":", "unset", "readonly",
            "break", "continue", "umask", "ulimit", "getopts", "type", "alias", "hash", "jobs", "fg",
            "bg", "pwd", "times", "for", "in", "case", "esac", "fi", "done", "function", "select",
            "declare", "typeset", "let", "shopt", "source", ".", "then", "do", "else", "elif", "if",
            "while", "until", "!", "{", "}", "exec", "command", "builtin", "mapfile", "kill"}
# words after which the next word is again in command position
PREFIX = {"then", "do", "else", "elif", "if", "while", "until", "!", "exec", "command", "nohup", "env",
          "time", "xargs", "nice", "builtin", "-exec", "-execdir", "su-exec", "gosu", "chroot",
          "setpriv", "tini", "dumb-init", "sudo", "doas", "timeout"}
OPERATORS = {";", "&", "|", "&&", "||", "(", ")", "{", "}", "\n", "$(", "`", ";;"}
_TOKEN = re.compile(r"\$\(|`|&&|\|\||;;|[;&|(){}\n]|(?:[^\s;&|()`]|\$\()+")


@dataclass(frozen=True)
class Use:
    """One word of a script the minimizer follows (module doc)."""

    kind: Literal["path", "command", "source"]
    word: str


def uses(text: str) -> Iterator[Use]:
    """The paths, commands and sourced files `text` names, in order (module doc)."""
    lines = []
    for ln in text.splitlines():
        if ln.lstrip().startswith("#"):
            continue
        lines.append(re.sub(r"\s#.*$", "", ln))
    at_cmd = True
    source_next = False
    for tok in _TOKEN.findall("\n".join(lines)):
        if tok in OPERATORS:
            at_cmd = True
            continue
        word = tok.strip("\"'")
        if word.startswith("/"):
            yield Use("path", word.rstrip(";\"'"))
        if source_next:
            source_next = False
            at_cmd = False
            yield Use("source", word)
            continue
        if not at_cmd or "=" in word and not word.startswith("="):   # an argument; FOO=bar cmd
            continue
        if word in (".", "source"):
            source_next = True
            at_cmd = False
            continue
        if word in PREFIX:
            continue
        at_cmd = False
        if word and "$" not in word and "`" not in word and word not in BUILTINS:
            yield Use("command", word)
