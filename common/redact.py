"""The one redaction step, shared by the orchestrator and the MCP servers: what is stored, published, streamed,
logged or traced passes it first.

It masks the secret values a process holds (its environment's …TOKEN, …KEY and …SECRET variables, and any it is
given) in the encodings they are commonly found in — as is, JSON-escaped, URL-encoded, hex (lower and upper case),
base64 and base64url, whole or at any of the three alignments inside a longer base64 text — and strings shaped like
the tokens of the services we hold tokens for (`ghp_…`, `github_pat_…`, `sk-ant-…`, a `Bearer` value).
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import quote, quote_plus, unquote, urlsplit

TOKEN_PATTERN = re.compile(r"(?:gh[pousr]_[A-Za-z0-9]{20,}|github_pat_[A-Za-z0-9_]{20,}|sk-ant-[A-Za-z0-9_-]{20,}"
                           r"|(?<=Bearer )[A-Za-z0-9._~+/=-]{16,})")
MASK = "[redacted]"
MIN_SECRET_CHARS = 8  # shorter values are too likely to occur by chance to be masked everywhere


def secret_values(env: Mapping[str, str] | None = None) -> list[str]:
    """Values of the environment variables that hold secrets by their name (…TOKEN, …KEY, …SECRET), and the
    passwords in URLs (TB_DATABASE_URL's)."""
    env = os.environ if env is None else env
    found = {v for k, v in env.items() if k.upper().endswith(("TOKEN", "KEY", "SECRET")) and len(v) >= MIN_SECRET_CHARS}
    for value in env.values():
        if "://" in value and "@" in value:
            try:
                password = urlsplit(value.strip()).password
            except ValueError:
                continue
            found |= {p for p in (password, unquote(password or "")) if p and len(p) >= MIN_SECRET_CHARS}
    return sorted(found, key=len, reverse=True)


def encodings(secret: str) -> set[str]:
    """The forms `secret` takes in text: as is, and in every encoding the redaction step recognises."""
    raw = secret.encode()
    found = {secret, json.dumps(secret)[1:-1], json.dumps(secret, ensure_ascii=False)[1:-1],
             quote(secret, safe=""), quote(secret), quote_plus(secret), raw.hex(), raw.hex().upper()}
    for encode in (base64.b64encode, base64.urlsafe_b64encode):
        found.add(encode(raw).decode())  # whole, with its padding
        for offset in range(3):
            # Inside a longer base64 text the secret starts at some byte offset mod 3; only the characters that
            # depend on its bytes alone are the same whatever surrounds it.
            text = encode(b"\0" * offset + raw).decode().rstrip("=")
            first, end = -(-8 * offset // 6), 8 * (offset + len(raw)) // 6
            if end - first >= MIN_SECRET_CHARS:
                found.add(text[first:end])
    return {f for f in found if len(f) >= MIN_SECRET_CHARS}


class Redactor:
    """Masks known secret values, in their common encodings, and token-shaped strings in text."""

    def __init__(self, secrets: Iterable[str] | None = None):
        values = secret_values() if secrets is None else [s for s in secrets if len(s) >= MIN_SECRET_CHARS]
        # Longest first, so that no form is left half-masked by a shorter one it contains.
        self.secrets = sorted({f for v in values for f in encodings(v)}, key=len, reverse=True)
        self._known = re.compile("|".join(map(re.escape, self.secrets))) if self.secrets else None
        self._known_bytes = (re.compile(b"|".join(re.escape(s.encode()) for s in self.secrets))
                             if self.secrets else None)

    def __call__(self, text: str) -> str:
        """`text` with every known secret, in any of its forms, and every token-shaped string masked."""
        if self._known is not None:
            text = self._known.sub(MASK, text)
        return TOKEN_PATTERN.sub(MASK, text)

    def matches(self, text: str) -> list[tuple[int, int]]:
        """Where in `text` something would be masked, as (start, end) spans, in order."""
        spans = [m.span() for m in TOKEN_PATTERN.finditer(text)]
        if self._known is not None:
            spans += [m.span() for m in self._known.finditer(text)]
        return sorted(spans)

    def holds_secret(self, data: str | bytes) -> bool:
        """Whether `data` holds one of the known secret values, in any of its forms (token shapes do not count)."""
        if isinstance(data, str):
            return self._known is not None and self._known.search(data) is not None
        return self._known_bytes is not None and self._known_bytes.search(data) is not None

    def files_with_secrets(self, changeset: Mapping[str, Any]) -> list[str]:
        """The paths of a changeset's files whose content holds a known secret value, in any of its forms."""
        leaking = []
        for entry in changeset.get("files") or []:
            try:
                content = base64.b64decode(entry.get("content_base64") or "", validate=True)
            except (binascii.Error, ValueError):
                content = str(entry.get("content_base64")).encode()
            if self.holds_secret(content) or self.holds_secret(str(entry.get("path", ""))):
                leaking.append(self(str(entry.get("path", ""))))
        leaking += [self(str(path)) for path in changeset.get("deleted") or [] if self.holds_secret(str(path))]
        return leaking

    def data(self, value: Any) -> Any:
        """`value` (JSON-like: dicts, lists, strings) with every string in it redacted."""
        if isinstance(value, str):
            return self(value)
        if isinstance(value, dict):
            return {self(k) if isinstance(k, str) else k: self.data(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self.data(v) for v in value]
        return value


PREFIXES = ("ghp_", "gho_", "ghs_", "ghu_", "ghr_", "github_pat_", "sk-ant-", "Bearer ")
_TOKEN_CHARS = re.compile(r"[A-Za-z0-9._~+/=-]*")
HOLD_MAX = 8192


class StreamRedactor:
    """Redacts a text that arrives in pieces, holding back a tail that could still grow into a secret."""

    def __init__(self, redactor: Redactor):
        self.redact = redactor
        self._by_first: dict[str, list[str]] = {}
        for form in redactor.secrets:
            self._by_first.setdefault(form[0], []).append(form)
        self._longest = max(map(len, redactor.secrets), default=0)
        self._prefix_firsts = {p[0] for p in PREFIXES}
        self.buf = ""

    def feed(self, piece: str) -> str:
        """The redacted text that is safe to send now that `piece` has arrived."""
        self.buf += piece
        cut = self._safe_end(self.buf)
        out, self.buf = self.buf[:cut], self.buf[cut:]
        return self.redact(out)

    def flush(self) -> str:
        """The rest, redacted: the text has ended."""
        out, self.buf = self.buf, ""
        return self.redact(out)

    def _safe_end(self, text: str) -> int:
        """Where the earliest suffix that is, or may become, a secret begins, moved back to the start of any match
        it would split; len(text) when there is none."""
        cut, spans = self._open_end(text), self.redact.matches(text)
        moved = True
        while moved:  # matches of the two patterns may overlap: moving back past one can land inside another
            moved = False
            for start, end in spans:
                if start < cut < end:
                    cut, moved = start, True
        return cut

    def _open_end(self, text: str) -> int:
        n = len(text)
        for p in range(max(0, n - HOLD_MAX), n):
            c = text[p]
            if n - p <= self._longest and any(form.startswith(text[p:]) for form in self._by_first.get(c, ())):
                return p
            if c in self._prefix_firsts:
                tail = text[p:]
                for prefix in PREFIXES:
                    if prefix.startswith(tail):
                        return p
                    if tail.startswith(prefix) and _TOKEN_CHARS.fullmatch(tail, len(prefix)):
                        return p
        return n


def redact_record(record: logging.LogRecord, redact: Redactor) -> logging.LogRecord:
    """`record` with its message, exception and stack text redacted; its arguments are kept when nothing in the
    message needed masking, since some formatters read them."""
    try:
        message, formatted = record.getMessage(), True
    except Exception:  # noqa: BLE001 - logging reports a malformed record with its arguments: mask them first
        message, formatted = f"{record.msg} {record.args}", False
    clean = redact(message)
    if clean != message or not formatted or not isinstance(record.msg, str):
        record.msg, record.args = clean, None
    if record.exc_info:
        record.exc_text = redact(record.exc_text or logging.Formatter().formatException(record.exc_info))
        record.exc_info = None
    elif record.exc_text:
        record.exc_text = redact(record.exc_text)
    if record.stack_info:
        record.stack_info = redact(record.stack_info)
    return record


class RedactingFilter(logging.Filter):
    """Masks secrets in every log record a handler emits."""

    def __init__(self, redactor: Redactor):
        super().__init__()
        self.redactor = redactor

    def filter(self, record: logging.LogRecord) -> bool:
        redact_record(record, self.redactor)
        return True


def redact_all_logs(redactor: Redactor) -> None:
    """Redact every log record this process makes, whatever handler (ours or a library's own) emits it."""
    make = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        return redact_record(make(*args, **kwargs), redactor)

    logging.setLogRecordFactory(factory)
