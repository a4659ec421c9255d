"""Render a model card's markdown to safe HTML: markdown-it for the syntax, nh3 to strip anything active."""
import re

import nh3
from markdown_it import MarkdownIt

_FRONT_MATTER = re.compile(r"\A---\s*\n.*?\n---\s*(\n|\Z)", re.DOTALL)
_markdown = MarkdownIt("commonmark", {"html": False, "linkify": False}).enable("table").enable("strikethrough")


def card_html(text: str) -> str:
    body = _FRONT_MATTER.sub("", text or "", count=1)
    return nh3.clean(_markdown.render(body), link_rel="nofollow noopener noreferrer")
