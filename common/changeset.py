"""The changeset: what the sandbox's `export_changes` gives and the github server's `commit_changes` takes, so both
forges can apply it without a patch engine. One definition, for both servers and the orchestrator between them."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

MAX_CHANGESET_BYTES = 50 * 1024 * 1024  # of decoded content, all files together
MAX_FILE_BYTES = 10 * 1024 * 1024
MAX_ENTRIES = 2000


class ChangedFile(BaseModel):
    path: str = Field(max_length=4096)
    mode: Literal["100644", "100755", "120000"]
    content_base64: str = Field(description="The file's whole new content (a link's target for mode 120000).")


class Changeset(BaseModel):
    """Full new contents of every added or modified file, and the deleted paths, against `base_commit`."""

    base_commit: str = Field(description="The commit the changes were made on.")
    files: list[ChangedFile] = Field(default_factory=list)
    deleted: list[str] = Field(default_factory=list)
