"""The one redaction step that everything leaving the orchestrator passes: SSE events, logs and spans."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping

TOKEN_PATTERN = re.compile(r"(?:gh[pousr]_[A-Za-z0-9]{20,}|github_pat_[A-Za-z0-9_]{20,}|sk-ant-[A-Za-z0-9_-]{20,})")
MASK = "[redacted]"


def secret_values(env: Mapping[str, str] | None = None) -> list[str]:
    """Values of the environment variables that hold secrets by their name (…TOKEN, …KEY, …SECRET)."""
    env = os.environ if env is None else env
    found = {v for k, v in env.items() if k.upper().endswith(("TOKEN", "KEY", "SECRET")) and len(v) >= 8}
    return sorted(found, key=len, reverse=True)  # longest first, so no secret is left half-masked


class Redactor:
    def __init__(self, secrets: list[str] | None = None):
        self.secrets = secret_values() if secrets is None else secrets

    def __call__(self, text: str) -> str:
        for value in self.secrets:
            if value in text:
                text = text.replace(value, MASK)
        return TOKEN_PATTERN.sub(MASK, text)


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
