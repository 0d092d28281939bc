"""The package's Jinja2 templates (``transfer/templates/``): the transfer report and the
data validation report. Autoescaped: every value from a run or a dataset is text."""

from __future__ import annotations

import functools
from typing import Any

from jinja2 import Environment, PackageLoader


@functools.cache
def environment() -> Environment:
    return Environment(loader=PackageLoader("transfer", "templates"), autoescape=True,
                       extensions=["jinja2.ext.do"])


def render(template: str, **context: Any) -> str:
    return environment().get_template(template).render(**context)
