"""Store URLs as they may be printed: a `redis://user:password@host` URL carries the
password the deployment reads from a Secret, and logs are read by more people than the
Secret is."""

from __future__ import annotations

import re

_USERINFO = re.compile(r"//[^@/]*@")


def redacted(url: str) -> str:
    """`url` with any user and password replaced by `***`; other text is returned as is."""
    return _USERINFO.sub("//***@", url) if isinstance(url, str) else url
