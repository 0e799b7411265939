"""The one redaction step that everything leaving the orchestrator passes: SSE events, logs and spans."""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping

TOKEN_PATTERN = re.compile(r"(?:gh[pousr]_[A-Za-z0-9]{20,}|github_pat_[A-Za-z0-9_]{20,}|sk-ant-[A-Za-z0-9_-]{20,}"
                           r"|(?<=Bearer )[A-Za-z0-9._~+/=-]{16,})")
MASK = "[redacted]"


def secret_values(env: Mapping[str, str] | None = None) -> list[str]:
    """Values of the environment variables that hold secrets by their name (…TOKEN, …KEY, …SECRET)."""
    env = os.environ if env is None else env
    found = {v for k, v in env.items() if k.upper().endswith(("TOKEN", "KEY", "SECRET")) and len(v) >= 8}
    return sorted(found, key=len, reverse=True)  # longest first, so no secret is left half-masked


class Redactor:
    def __init__(self, secrets: list[str] | None = None):
        values = secret_values() if secrets is None else secrets
        # Also as JSON escapes them, since events are redacted once encoded.
        escaped = {json.dumps(v)[1:-1] for v in values} - set(values)
        self.secrets = sorted([*values, *escaped], key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for value in self.secrets:
            if value in text:
                text = text.replace(value, MASK)
        return TOKEN_PATTERN.sub(MASK, text)


PREFIXES = ("ghp_", "gho_", "ghs_", "ghu_", "ghr_", "github_pat_", "sk-ant-", "Bearer ")
_TOKEN_CHARS = re.compile(r"[A-Za-z0-9._~+/=-]*")
HOLD_MAX = 8192


class StreamRedactor:
    """Redacts a text that arrives in pieces, holding back a tail that could still grow into a secret."""

    def __init__(self, redactor: Redactor):
        self.redact = redactor
        self.starts = PREFIXES + tuple(redactor.secrets)
        self.first_chars = {s[0] for s in self.starts}
        self.buf = ""

    def feed(self, piece: str) -> str:
        self.buf += piece
        cut = self._safe_end(self.buf)
        out, self.buf = self.buf[:cut], self.buf[cut:]
        return self.redact(out)

    def flush(self) -> str:
        out, self.buf = self.buf, ""
        return self.redact(out)

    def _safe_end(self, text: str) -> int:
        """Where the earliest suffix that is, or may become, a secret begins; len(text) when there is none."""
        for p in range(max(0, len(text) - HOLD_MAX), len(text)):
            if text[p] not in self.first_chars:
                continue
            tail = text[p:]
            for start in self.starts:
                if start.startswith(tail):
                    return p
                if start in PREFIXES and tail.startswith(start) and _TOKEN_CHARS.fullmatch(tail, len(start)):
                    return p
        return len(text)


class RedactingFilter(logging.Filter):
    """Masks secrets in every log record a handler emits."""

    def __init__(self, redactor: Redactor):
        super().__init__()
        self.redactor = redactor

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = self.redactor(record.getMessage()), None
        if record.exc_info:
            record.exc_text = self.redactor(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        return True
