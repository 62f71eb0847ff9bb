"""The built-in corpus `python-docs`: the standard library's own documentation, rendered by `pydoc`."""

from __future__ import annotations

import functools
import json

from secateurs.data.format import DataError

# Rendered in a fresh interpreter (see python_docs_texts). `pkgutil`/`pydoc` are the standard library's own
# module lister and documentation renderer; the script only picks the modules and strips memory addresses.
_RENDER_PYTHON_DOCS = r"""
import json, os, pkgutil, pydoc, re, sys, warnings

os.environ.clear()  # before any module is imported: pydoc would render it (see python_docs_texts)

skip = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "lib2to3", "test", "pydoc_data"}
names = sorted(
    m.name
    for m in pkgutil.iter_modules()
    if m.name in sys.stdlib_module_names and not m.name.startswith("_") and m.name not in skip
)
address = re.compile(r"( at 0x|, handle )[0-9a-fA-F]{8,}")
texts = []
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    for name in names:
        try:
            text = pydoc.render_doc(__import__(name), renderer=pydoc.plaintext)
        except Exception:  # some modules need a display, a platform or optional C libraries
            continue
        # Reprs such as `<object object at 0x7f93ed9a4160>` or `<PyDLL 'None', handle 7faa335e42e0>` carry this
        # process's memory addresses.
        texts.append(address.sub("", text))
json.dump(texts, sys.stdout)
"""


def python_docs_texts() -> list[str]:
    """The standard library's own documentation rendered as plain text: ~4 MB of English prose and signatures
    available on any machine with Python, which is what makes the demo and the tests work offline.

    pydoc renders the state of the process it runs in: `os.environ` (the default of `os` and `cgi` arguments, so every
    environment variable, credentials included), functions that imported libraries patch (torch replaces
    `inspect.getfile`, transformers adds `Logger.info_once`), the warnings registry, and `.pth` hooks of installed
    packages (setuptools' shim swaps the `distutils` page for its own copy). The pages are therefore rendered in a
    fresh isolated interpreter (`-I -S`: no site-packages, no PYTHON* variables) whose environment is emptied before
    any page is rendered: the corpus leaks nothing and is the same from every process on a machine.
    """
    return list(_render_python_docs())


@functools.cache  # the render no longer depends on the calling process: once per process is enough
def _render_python_docs() -> tuple[str, ...]:
    import os
    import subprocess
    import sys

    # Only what the interpreter itself may need to start (a libpython outside the loader's default paths).
    loader = {k: v for k, v in os.environ.items() if k in ("LD_LIBRARY_PATH", "DYLD_LIBRARY_PATH", "SYSTEMROOT")}
    done = subprocess.run(
        [sys.executable, "-I", "-S", "-c", _RENDER_PYTHON_DOCS], env=loader, capture_output=True, text=True,
        check=False,
    )  # fmt: skip
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        raise DataError(f"rendering the python-docs corpus failed: {last}")
    return tuple(json.loads(done.stdout))
