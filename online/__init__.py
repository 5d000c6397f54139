"""The online state shared by every replica: per-user features read at request time."""

from common.stub_python import ensure_ssl

# Before any submodule imports redis (see common/stub_python.py: the Triton stub case).
ensure_ssl()
