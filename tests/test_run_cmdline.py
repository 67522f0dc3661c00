"""builder.run.cmdline: the one guest command-line builder, checked against the init's own parser.

The words are read back by initramfs/init.c's read_cmdline itself: the init source is compiled with a small
main that prints what read_cmdline splits, and run in a private mount namespace where the test's command
line is bind-mounted over /proc/cmdline.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from builder import init
from builder.errors import BadInput
from builder.run import cmdline
from builder.run.cmdline import with_args

HARNESS = """
#define main xbuild_init_main
#include "init.c"
#undef main
int main(void)
{
    struct strv words = {0};
    read_cmdline(&words);
    for (int i = 0; i < words.n; i++)
        fwrite(words.v[i], 1, strlen(words.v[i]) + 1, stdout);
    return 0;
}
"""
BASE = "console=ttyS0 quiet rdinit=/.xbuild/init -- nginx -g daemon"


@pytest.fixture(scope="module")
def init_parser(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-m", "true"]).returncode:
        pytest.skip("needs unshare -m (a private mount namespace) to show the init a /proc/cmdline")
    d = tmp_path_factory.mktemp("parser")
    (d / "harness.c").write_text(HARNESS)
    exe = d / "parser"
    subprocess.run(
        [init.compiler(), "-O1", "-w", f"-I{init.SOURCE.parent}", "-o", str(exe), str(d / "harness.c")],
        check=True,
    )
    return exe


def init_reads(parser: Path, line: str) -> list[str]:
    """The words initramfs/init.c's read_cmdline makes of `line` as /proc/cmdline (the kernel adds \\n)."""
    f = parser.with_name("cmdline")
    f.write_bytes(line.encode() + b"\n")
    out = subprocess.run(
        [
            "unshare",
            "-m",
            "sh",
            "-c",
            'mount --bind "$1" /proc/cmdline && exec "$2"',
            "-",
            str(f),
            str(parser),
        ],
        capture_output=True,
        check=True,
    ).stdout
    return [w.decode() for w in out.split(b"\0")[:-1]]


def after_init(parser: Path, line: str) -> tuple[list[str], list[str]]:
    """(the words the init reads as its own, the words replacing Cmd): split at the first bare `--`."""
    words = init_reads(parser, line)
    if "--" not in words:
        return words, []
    i = words.index("--")
    return words[:i], words[i + 1 :]


def test_words_and_separator() -> None:
    assert with_args("console=hvc0") == "console=hvc0"
    assert with_args("console=hvc0 -- nginx -g x", (), ["sh", "a b"]) == 'console=hvc0 -- sh "a b"'
    assert with_args("console=hvc0", (), ["x"]) == "console=hvc0 -- x"
    assert with_args("console=hvc0 -- cmd", ["xbuild.env=A=1"]) == "console=hvc0 xbuild.env=A=1 -- cmd"
    assert with_args("q", ["xbuild.env=A=b c"], ["x", "y z", ""]) == 'q "xbuild.env=A=b c" -- x "y z" ""'
    assert with_args("q", (), ["--", "-x"]) == "q -- -- -x"  # after the separator `--` is a word


@pytest.mark.parametrize("word", ['say "hi"', "a\nb", "tab\there", "nul\0", "\x1b[31m", "nb\u00a0sp"])
def test_unwritable_words_are_refused(word: str) -> None:
    for args in ((word,), ()), ((), (word,)):
        with pytest.raises(BadInput, match="cannot pass"):
            with_args("q", *args)


def test_a_separator_among_kernel_args_and_an_overlong_line_are_refused() -> None:
    with pytest.raises(BadInput, match="`--` cannot be passed"):
        with_args("q", ["--"])
    with pytest.raises(BadInput, match="more than the 2048"):
        with_args("q", (), ["x" * 2048])


def test_more_words_than_the_kernel_hands_init_are_refused() -> None:
    """Linux panics at boot past 31 init arguments (CONFIG_INIT_ENV_ARG_LIMIT): refused instead."""
    assert with_args("q", (), [str(i) for i in range(31)]).endswith(" -- " + " ".join(map(str, range(31))))
    with pytest.raises(BadInput, match="32 words after `--`"):
        with_args("q", (), [str(i) for i in range(32)])


def test_the_init_reads_the_artifacts_words_and_keeps_its_cmd(init_parser: Path) -> None:
    assert after_init(init_parser, with_args(BASE)) == (BASE.split()[:3], ["nginx", "-g", "daemon"])
    assert init_reads(init_parser, 'a "b  c"d "" e') == ["a", "b  cd", "", "e"]  # the parser's own rules


WORD = st.text(
    st.characters(codec="utf-8", exclude_categories=("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp")), max_size=12
).filter(lambda w: '"' not in w and w.isprintable())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    kernel_args=st.lists(WORD.filter(lambda w: w != "--"), max_size=4), extra_args=st.lists(WORD, max_size=6)
)
def test_every_printable_word_round_trips_through_the_init(
    init_parser: Path, kernel_args: list[str], extra_args: list[str]
) -> None:
    line = with_args(BASE, kernel_args, extra_args)
    head, tail = after_init(init_parser, line)
    assert head == BASE.split()[:3] + kernel_args
    assert tail == (extra_args or ["nginx", "-g", "daemon"])


@given(word=st.text(max_size=8))
def test_a_word_is_written_as_it_is_quoted_or_refused_for_a_reason(word: str) -> None:
    if '"' in word or not word.isprintable():
        with pytest.raises(BadInput):
            cmdline.quote(word)
    else:
        assert cmdline.quote(word) == (f'"{word}"' if not word or " " in word else word)
