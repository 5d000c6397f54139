"""Make `ssl` importable inside Triton's Python-backend stub.

The stub from the nvidia-pytriton wheel embeds the system's libpython (Debian's 3.11.2)
but imports the standard library of the first `python3` on PATH, our venv's (3.11.7 here).
That interpreter's `_ssl` extension uses a symbol 3.11.2 lacks (`_PyModule_Add`), so
`import ssl` fails in the stub, and redis-py, which every Redis-backed model imports,
fails with it. The running interpreter's own `_ssl` sits in the system's lib-dynload; load
that one. Outside the stub (or where `ssl` imports) this does nothing.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


def ensure_ssl() -> None:
    try:
        # lazy: the point of this function: does `ssl` import in this interpreter?
        import ssl
    except ImportError:
        pass
    else:
        return
    sys.modules.pop("ssl", None)
    v = sys.version_info
    for folder in (f"/usr/lib/python{v.major}.{v.minor}/lib-dynload",):
        for path in sorted(Path(folder).glob("_ssl.cpython-*.so")):
            spec = importlib.util.spec_from_file_location("_ssl", path)
            if spec is None or spec.loader is None:
                continue
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            sys.modules["_ssl"] = module
            import ssl  # noqa: F401  (now with the matching _ssl)

            return
