"""Numbers as people read them, and a report's sections as Markdown and as one HTML page.

Both renderers take the same sections, so report.md and index.html always say the same thing.
The HTML page is self-contained: inline CSS, images as base64 data URIs, nothing fetched.
"""

from __future__ import annotations

import base64
import html
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

MIB = 1024**2
GIB = 1024**3
# Units by metric-name suffix, the first match wins ("_tokens_per_s" before "_s").
_UNITS = (
    ("tokens_per_s", "tokens/s"),
    ("samples_per_s", "samples/s"),
    ("tflops_per_rank", "TFLOP/s per rank"),
    ("_pct", "%"),
    ("_w", "W"),
    ("_s", "s"),
)


HALF_WIDTH = " ± 95%"  # names a column of 95% half-widths after its metric's column


def format_bytes(value: float) -> str:
    """MiB below 1 GiB, else GiB."""
    return f"{value / GIB:.2f} GiB" if abs(value) >= GIB else f"{value / MIB:.3g} MiB"


def _is_number(value: Any) -> bool:
    """Python and numpy numbers, not booleans."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def format_number(value: Any) -> str:
    """Whole numbers as such, others to 4 significant digits (no decimals from 100 up)."""
    if not _is_number(value):
        return str(value)
    if not math.isfinite(value):
        return "" if math.isnan(value) else str(value)
    if float(value).is_integer() or abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.4g}"


def format_metric(name: str, value: Any) -> str:
    """A value with the unit its metric name implies (bytes as MiB/GiB); "" when missing."""
    if value is None or value is pd.NA or (_is_number(value) and math.isnan(value)):
        return ""
    if _is_number(value):
        if name.endswith("_bytes"):
            return format_bytes(value)
        unit = next((unit for suffix, unit in _UNITS if name.endswith(suffix)), "")
        return f"{format_number(value)} {unit}".rstrip()
    if isinstance(value, (tuple, list)):
        return ", ".join(str(item) for item in value)
    return str(value)


def display(frame: pd.DataFrame) -> pd.DataFrame:
    """Every cell as text, formatted by its column's name (see `format_metric`); a column
    "<metric> ± 95%" (half-widths) in its metric's unit."""
    return pd.DataFrame(
        {
            column: [
                format_metric(str(column).removesuffix(HALF_WIDTH), value)
                for value in frame[column]
            ]
            for column in frame.columns
        },
        columns=frame.columns,
        dtype=object,
    )


class Image(NamedTuple):
    name: str  # file name next to report.md
    png: bytes


class Table(NamedTuple):
    caption: str
    frame: pd.DataFrame  # cells already text (see `display`)


@dataclass(frozen=True)
class Section:
    title: str
    paragraphs: Sequence[str] = ()
    image: Image | None = None
    tables: Sequence[Table] = ()
    images: Sequence[Image] = ()  # more figures, after the tables

    @property
    def all_images(self) -> list[Image]:
        return ([self.image] if self.image is not None else []) + list(self.images)


def _markdown_cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown_table(frame: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table."""
    lines = [
        "| " + " | ".join(_markdown_cell(c) for c in frame.columns) + " |",
        "|" + "---|" * len(frame.columns),
    ]
    lines += ["| " + " | ".join(_markdown_cell(c) for c in row) + " |" for row in frame.values]
    return "\n".join(lines)


def to_markdown(title: str, sections: Sequence[Section]) -> str:
    """report.md: images are referenced as the PNG files written next to it."""
    parts = [f"# {title}"]
    for section in sections:
        parts.append(f"## {section.title}")
        parts += list(section.paragraphs)
        if section.image is not None:
            parts.append(f"![{section.title}]({section.image.name})")
        for table in section.tables:
            parts += [table.caption, markdown_table(table.frame)]
        parts += [f"![{section.title}]({image.name})" for image in section.images]
    return "\n\n".join(part for part in parts if part) + "\n"


_CSS = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1200px;
       padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; } h2 { margin-top: 2em; border-bottom: 1px solid #ccc; }
img { max-width: 100%; height: auto; display: block; margin: 1em 0; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-size: 13px; margin: 0.5em 0 1.5em; width: max-content; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: left; vertical-align: top;
         max-width: 26em; }
th { background: #f3f3f3; position: sticky; top: 0; }
tr:nth-child(even) td { background: #fafafa; }
"""


def _html_table(table: Table) -> str:
    body = table.frame.to_html(index=False, escape=True, border=0, na_rep="")
    caption = f"<p>{html.escape(table.caption)}</p>" if table.caption else ""
    return f'{caption}<div class="scroll">{body}</div>'


def _html_image(image: Image, alt: str) -> str:
    data = base64.b64encode(image.png).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


def to_html(title: str, sections: Sequence[Section]) -> str:
    """index.html: one file that works offline (the empty icon link stops a favicon fetch)."""
    body = [f"<h1>{html.escape(title)}</h1>"]
    for section in sections:
        body.append(f"<h2>{html.escape(section.title)}</h2>")
        body += [f"<p>{html.escape(text)}</p>" for text in section.paragraphs]
        if section.image is not None:
            body.append(_html_image(section.image, section.title))
        body += [_html_table(table) for table in section.tables]
        body += [_html_image(image, section.title) for image in section.images]
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f'<link rel="icon" href="data:,">\n<title>{html.escape(title)}</title>\n'
        f"<style>{_CSS}</style>\n</head>\n<body>\n" + "\n".join(body) + "\n</body>\n</html>\n"
    )
