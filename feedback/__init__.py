"""feedback: event log, join into labels, north-star metrics.

See feedback/README.md.
"""

from common.stub_python import ensure_ssl

# Before any submodule imports ssl through redis or pyarrow.fs (the Parquet lake): inside
# Triton's Python stub the venv's _ssl does not load (see common/stub_python.py).
ensure_ssl()
