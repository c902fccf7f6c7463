"""dutils.errors: text from outside shown with every control character escaped, and the one user-facing Error."""

import pytest

from dutils.errors import Error, printable

C0, C1 = [chr(code) for code in range(0x20)], [chr(code) for code in range(0x80, 0xA0)]


def test_every_control_character_is_escaped_as_python_would_write_it():
    for char in [*C0, "\x7f", *C1]:
        assert printable(f"a{char}b") == f"a\\x{ord(char):02x}b"


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("layer\nd-pull: error: forged", "layer\\x0ad-pull: error: forged"),  # no second line to read
        ("\x1b]0;owned\x07title", "\\x1b]0;owned\\x07title"),  # no terminal title
        ("\x1b[2J\x1b[Hclear", "\\x1b[2J\\x1b[Hclear"),  # no cursor movement
        ("tab\there\rback", "tab\\x09here\\x0dback"),
        ("\x9b31mred", "\\x9b31mred"),  # the C1 form of the escape sequence introducer
    ],
)
def test_what_a_hostile_name_would_do_to_a_terminal_is_shown_instead(text, shown):
    assert printable(text) == shown


@pytest.mark.parametrize("text", ["", "plain ascii ~!@#$%^&*()", "étage/données", "镜像", "a\u00a0b", "emoji 🐳"])
def test_printable_text_is_left_as_it_is(text):
    assert printable(text) == text


def test_an_error_is_its_message_and_its_hint_on_one_line():
    err = Error("manifest sha256:abc is missing", "check the tag")
    assert str(err) == "manifest sha256:abc is missing; check the tag"
    assert (err.message, err.hint) == ("manifest sha256:abc is missing", "check the tag")
    assert str(Error("no hint")) == "no hint" and Error("no hint").hint == ""


def test_an_error_escapes_what_it_shows_and_keeps_what_it_was_given():
    err = Error("member evil\nname", "the registry said:\x1b[31m no")
    assert str(err) == "member evil\\x0aname; the registry said:\\x1b[31m no"
    assert "\n" not in str(err) and "\x1b" not in str(err)
    assert err.message == "member evil\nname" and err.hint == "the registry said:\x1b[31m no"


def test_an_error_is_an_exception_caught_as_one():
    with pytest.raises(Error, match="cannot read") as caught:
        raise Error("cannot read x")
    assert isinstance(caught.value, Exception) and caught.value.args == ("cannot read x",)
