"""The one redaction step: known secrets in their common encodings, token shapes, text that arrives in pieces, log
records, and changesets that must not be published."""

from __future__ import annotations

import base64
import io
import json
import logging
from urllib.parse import quote

import pytest

from common.redact import MASK, RedactingFilter, Redactor, StreamRedactor, redact_record, secret_values

SECRET = 'p@ss/w0rd+"quoted"\\-' + "Zx9" * 8  # characters that JSON, URL and base64 each encode differently
RAW = SECRET.encode()


def b64(data: bytes, alphabet=base64.b64encode) -> str:
    return alphabet(data).decode()


def secret_only(encoded: str, offset: int) -> str:
    """The characters of a base64 text that depend on the secret's bytes alone, when it starts `offset` bytes in."""
    return encoded[-(-8 * offset // 6):8 * (offset + len(RAW)) // 6]


@pytest.mark.parametrize("form", [
    SECRET, json.dumps(SECRET)[1:-1], quote(SECRET, safe=""), quote(SECRET), RAW.hex(), RAW.hex().upper(),
    b64(RAW), b64(RAW, base64.urlsafe_b64encode),
], ids=["raw", "json", "url", "url-path", "hex", "HEX", "base64", "base64url"])
def test_a_known_secret_is_masked_in_each_common_encoding(form):
    assert Redactor([SECRET])(f"before {form} after") == f"before {MASK} after"


@pytest.mark.parametrize("alphabet", [base64.b64encode, base64.urlsafe_b64encode], ids=["base64", "base64url"])
@pytest.mark.parametrize("before", [b"", b"a", b"ab", b"abc", b"abcd", b"\xff\xfe\x00\x01\x02"])
def test_a_secret_inside_a_longer_base64_text_is_masked_at_every_alignment(before, alphabet):
    encoded = b64(before + RAW + b"\x00tail", alphabet)
    core = secret_only(encoded, len(before))
    out = Redactor([SECRET])(encoded)
    assert MASK in out and not [core[i:i + 8] for i in range(len(core) - 7) if core[i:i + 8] in out]


def test_names_of_secrets_in_the_environment_decide_what_is_known():
    env = {"GITHUB_TOKEN": "ghp-value-1234", "ANTHROPIC_API_KEY": "key-value-1234", "MODAL_TOKEN_SECRET": "s" * 12,
           "TB_API_TOKEN": "short", "HOME": "/home/not-a-secret"}
    assert sorted(secret_values(env)) == sorted(["ghp-value-1234", "key-value-1234", "s" * 12])


def test_the_password_of_a_url_in_the_environment_is_a_known_secret():
    env = {"TB_DATABASE_URL": "postgresql://tb:p%40ss-word-1234@db.internal:5432/tb", "OTHER_URL": "https://x/y"}
    redact = Redactor(secret_values(env))
    said = redact("could not connect: password 'p@ss-word-1234' (p%40ss-word-1234) refused for tb@db.internal")
    assert "p@ss-word" not in said and "p%40ss" not in said and "tb@db.internal" in said


def test_token_shapes_are_masked_without_being_known():
    text = f"a ghp_{'a' * 36} b github_pat_{'b' * 40} c sk-ant-api03-{'c' * 40} d Bearer {'d' * 20} e"
    assert Redactor([])(text) == f"a {MASK} b {MASK} c {MASK} d Bearer {MASK} e"


def test_an_encoded_secret_split_across_pieces_at_any_point_comes_out_masked_as_a_whole():
    redact = Redactor([SECRET])
    text = f"x {b64(b'.' + RAW)} y {RAW.hex()} z {json.dumps(SECRET)[1:-1]} w ghp_{'q' * 30} v"
    whole = redact(text)
    assert SECRET not in whole and whole.count(MASK) == 4
    for cut in range(1, len(text)):
        stream = StreamRedactor(redact)
        assert stream.feed(text[:cut]) + stream.feed(text[cut:]) + stream.flush() == whole, cut
    stream = StreamRedactor(redact)
    assert "".join(stream.feed(text[i:i + 5]) for i in range(0, len(text), 5)) + stream.flush() == whole


def test_a_stream_holds_back_only_what_could_still_become_a_secret():
    stream = StreamRedactor(Redactor([SECRET]))
    assert stream.feed("plain words, ") == "plain words, "
    assert stream.feed("then p@ss/") == "then "
    assert stream.feed("word") == "p@ss/word"


def test_a_changeset_is_checked_file_by_file_and_only_for_known_values():
    redact = Redactor([SECRET])

    def entry(path: str, content: bytes) -> dict:
        return {"path": path, "mode": "100644", "content_base64": base64.b64encode(content).decode()}

    changeset = {"base_commit": "a" * 40, "deleted": [f"old-{SECRET}.txt", "gone.txt"], "files": [
        entry("clean.py", b"x = 1\n"), entry("shaped.py", f"FAKE = 'ghp_{'f' * 36}'\n".encode()),
        entry("hex.env", RAW.hex().upper().encode()), entry("blob.bin", b"\x89PNG" + b64(b"xy" + RAW).encode()),
        entry(f"{SECRET}.txt", b"name only")]}
    assert redact.files_with_secrets(changeset) == ["hex.env", "blob.bin", f"{MASK}.txt", f"old-{MASK}.txt"]


def test_log_records_are_masked_in_message_arguments_and_traceback_and_keep_clean_arguments():
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.addFilter(RedactingFilter(Redactor([SECRET])))
    logger = logging.getLogger("tests.common.redact")
    logger.addHandler(handler)
    try:
        logger.error("auth with %s", b64(RAW))
        try:
            raise RuntimeError(f"boom {RAW.hex()}")
        except RuntimeError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    logged = out.getvalue()
    assert f"auth with {MASK}" in logged and f"boom {MASK}" in logged and RAW.hex() not in logged
    clean = redact_record(logging.LogRecord("x", logging.INFO, __file__, 1, "%s %d", ("a", 2), None),
                          Redactor([SECRET]))
    assert clean.args == ("a", 2) and clean.getMessage() == "a 2"


def test_data_is_redacted_in_every_string_it_holds():
    event = {"type": "tool_call", "input": {"content": f"k={SECRET}", "list": [RAW.hex(), 3]}, "seq": 1}
    assert Redactor([SECRET]).data(event) == {"type": "tool_call", "input": {"content": f"k={MASK}",
                                                                              "list": [MASK, 3]}, "seq": 1}
