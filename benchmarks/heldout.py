"""A second evaluation text that no training or calibration ever reads: docstrings of standard-library modules.

The built-in corpus (``pydoc_data.topics``) is the language reference; this text is the library's
own documentation, written separately. It is assembled the same way on every run: for each module
in ``MODULES`` (in that order), the module docstring, then the docstrings of its public classes and
functions defined in it, by sorted name, as ``name: docstring``; all joined with blank lines.
Its fingerprint depends on the CPython version (3.11.7 here): the benchmark prints and records it.
sparsellm's ``docstrings`` corpus (data.py: every docstring of the standard library) holds these
docstrings too: a model trained on it has seen this text, so it is held out only from the builtin runs.
"""

from __future__ import annotations

import importlib
import inspect
import warnings

from sparsellm.data import Text

MODULES = (
    "argparse", "collections", "contextlib", "csv", "dataclasses", "datetime", "decimal", "difflib", "enum",
    "fractions", "functools", "heapq", "http.client", "ipaddress", "json", "logging", "pathlib", "pickle",
    "random", "shutil", "statistics", "string", "subprocess", "tarfile", "textwrap", "threading", "typing",
    "unittest.case", "urllib.parse", "uuid", "zipfile",
)


def stdlib_docstrings() -> Text:
    parts = []
    with warnings.catch_warnings():  # typing.io and typing.re warn when touched
        warnings.simplefilter("ignore", DeprecationWarning)
        for name in MODULES:
            module = importlib.import_module(name)
            if module.__doc__:
                parts.append(inspect.cleandoc(module.__doc__))
            for attribute in sorted(vars(module)):
                value = getattr(module, attribute)
                if attribute.startswith("_") or getattr(value, "__module__", None) != name:
                    continue
                if (inspect.isclass(value) or inspect.isfunction(value)) and value.__doc__:
                    parts.append(f"{attribute}: {inspect.cleandoc(value.__doc__)}")
    return Text("stdlib-docstrings", "all", "\n\n".join(parts))

if __name__ == "__main__":
    text = stdlib_docstrings()
    print(text.describe())
