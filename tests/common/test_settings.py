"""One typed reading of configuration for the orchestrator and both servers."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from common.settings import ConfigError, at_least, read, setting


@dataclass(frozen=True)
class Example:
    count: int = setting("X_COUNT", 3, check=at_least(1))
    ratio: float = setting("X_RATIO", 0.5)
    on: bool = setting("X_ON", False)
    roots: tuple[Path, ...] = setting("X_ROOTS", ())
    hosts: tuple[str, ...] = setting("X_HOSTS", ("github.com",))
    name: str | None = setting("X_NAME", None)
    token: str | None = setting("X_TOKEN", None, check=lambda v: None if len(v) > 8 else "is too short", repr=False)


def test_values_are_parsed_by_their_type_and_placeholders_count_as_unset():
    got = read(Example, {"X_COUNT": "7", "X_RATIO": "2.5", "X_ON": "yes", "X_ROOTS": "/a:/b", "X_HOSTS": "a, b",
                         "X_NAME": "${X_NAME}"})
    assert got == Example(count=7, ratio=2.5, on=True, roots=(Path("/a"), Path("/b")), hosts=("a", "b"))
    assert read(Example, {"X_COUNT": "", "X_ON": "0"}) == Example()


def test_every_bad_value_is_named_at_once_and_a_secret_is_never_repeated():
    with pytest.raises(ConfigError) as bad:
        read(Example, {"X_COUNT": "abc", "X_RATIO": "nan", "X_ON": "maybe", "X_TOKEN": "short"})
    message = str(bad.value)
    assert "X_COUNT='abc': expected a whole number" in message and "X_RATIO='nan'" in message
    assert "X_ON='maybe': expected 1 or 0" in message and "X_TOKEN: is too short" in message
    assert "short" not in message.replace("is too short", "")
    with pytest.raises(ConfigError, match="X_COUNT='0': must be 1 or more"):
        read(Example, {"X_COUNT": "0"})


def test_the_orchestrator_reads_its_settings_the_same_way():
    from orchestrator.config import Settings

    got = Settings.from_env({"TB_OVERLOADED_RETRIES": "0", "TB_LOCAL_ROOTS": "/srv/a:/srv/b", "TB_PLANNER_MODEL": "m",
                             "TB_GITHUB_HOSTS": "GitHub.com, ghe.example.com", "TB_API_TOKEN": "${TB_API_TOKEN}"})
    assert got.limits.overloaded_retries == 0 and got.local_roots == (Path("/srv/a"), Path("/srv/b"))
    assert got.role_models == {"planner": "m"} and got.github_hosts == ("github.com", "ghe.example.com")
    assert got.api_token is None
