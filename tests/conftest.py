"""Session-wide test settings."""

from __future__ import annotations

import os
import secrets

from serving import auth


def pytest_configure(config) -> None:
    # Every tritonserver the tests start locks its control plane with this key, and the
    # northstar commands they run (in-process or as subprocesses) send it. Setting it here
    # keeps the tests from creating ~/.config/northstar/admin.key on the machine.
    os.environ.setdefault(auth.KEY_ENV, secrets.token_urlsafe(32))
