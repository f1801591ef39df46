"""The one rule for telling a Hugging Face repo id ("owner/name") from a local path, for every
field that takes either (model_path, name_or_path, LORAMESH_*_MODEL)."""

from __future__ import annotations

import re

# Two names of letters, digits, '-', '_' and '.', each starting with a letter or digit, as the
# hub allows them. A path ("/models/x", "./x", "~/x", "a/../b") never matches.
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")


def is_repo_id(text: str) -> bool:
    return bool(_REPO_ID.match(text)) and ".." not in text
