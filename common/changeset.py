"""The changeset: what the sandbox's `export_changes` gives and the github server's `commit_changes` takes, so both
forges can apply it without a patch engine. One definition, for both servers and the orchestrator between them."""

from __future__ import annotations

import hashlib
import json
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
    """Full new contents of every added or modified file, and the deleted paths, against `base_commit`.

    A commit of it holds the base commit's tree with these changes, whatever was committed on the branch before:
    the sandbox's state, not a patch on the branch's."""

    base_commit: str = Field(description="The commit the changes were made on.")
    files: list[ChangedFile] = Field(default_factory=list)
    deleted: list[str] = Field(default_factory=list)
    parent: str | None = Field(None, description="The commit the new commit goes on top of: the branch's current "
                                                 "tip, refused when the branch is elsewhere. None: the branch is "
                                                 "made at the new commit, or must still be at base_commit.")

    def digest(self) -> str:
        """One hash of what the changeset makes of its base commit: equal for the same changes, in any order and
        whatever the parent."""
        state = {"base_commit": self.base_commit.lower(), "deleted": sorted(self.deleted),
                 "files": sorted((f.path, f.mode, f.content_base64) for f in self.files)}
        return hashlib.sha256(json.dumps(state, separators=(",", ":")).encode()).hexdigest()
