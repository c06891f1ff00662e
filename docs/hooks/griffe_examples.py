"""A Griffe extension for the API pages: read a Google-style ``Example:`` section as ``Examples:``.

stabwatch's docstrings head their doctests ``Example:`` (singular). Griffe's Google parser only knows
``Examples:``; it renders ``Example:`` as an admonition whose ``>>>`` lines become block quotes and whose
outputs (``[1.5]``) become broken cross-references. Renaming the heading before the docstring is parsed
makes them code blocks, as the doctests they are. Configured in ``mkdocs.yml`` (python handler options,
``extensions``).
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_EXAMPLE = re.compile(r"^(\s*)Example:[ \t]*$", re.MULTILINE)


class ExampleSections(griffe.Extension):
    """Rename ``Example:`` section headings to ``Examples:`` in every docstring."""

    def on_instance(self, *, obj: Any, **kwargs: Any) -> None:
        docstring = getattr(obj, "docstring", None)
        if docstring is not None and "Example:" in docstring.value:
            docstring.value = _EXAMPLE.sub(r"\1Examples:", docstring.value)
