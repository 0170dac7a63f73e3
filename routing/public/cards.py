"""A contributor's README.md as safe HTML for the public model card.

The README is written by whoever uploads a version, so it is untrusted: Markdown lets raw
HTML through, and nh3 (ammonia) then keeps only the tags and attributes below. The policy:

- Text and structure only: headings, paragraphs, lists, emphasis, code, quotes, tables.
- Links keep ``href`` only when it is absolute http(s) or mailto; anything else (javascript:,
  data:, protocol-relative ``//host``, relative paths that would look like our own pages) is
  dropped and the text stays. Every link gets rel="nofollow noopener noreferrer": a card
  must not lend the site's standing to, or open a window handle for, the author's links.
- No images, not even https ones: a remote image lets its author see every visitor (address,
  time, browser) and swap the picture after review, and versions store no files but the
  README to serve images from ourselves. An image's alt text is kept as plain text.
- No ids, classes or styles: they could collide with or restyle the page around the card.
- <script>, <style> and the like go with their content; comments go.
"""

from __future__ import annotations

import re

import markdown
import nh3

ALLOWED_TAGS = {
    "h3", "h4", "h5", "h6", "p", "br", "hr", "blockquote", "pre", "code", "kbd", "samp",
    "em", "strong", "b", "i", "del", "sub", "sup", "ul", "ol", "li", "dl", "dt", "dd",
    "table", "thead", "tbody", "tr", "th", "td", "a", "abbr",
}  # fmt: skip
ALLOWED_ATTRIBUTES = {"a": {"href", "title"}, "abbr": {"title"}, "ol": {"start"}}
URL_SCHEMES = {"http", "https", "mailto"}
LINK_REL = "nofollow noopener noreferrer"
_ABSOLUTE = re.compile(r"^(https?://[^/]|mailto:)", re.IGNORECASE)
# The card sits under the page's h1 and its section's h2: its own headings start at h3.
HEADING_BASE = 3
_IMAGE = re.compile(r"<img\b[^>]*?\balt=\"([^\"]*)\"[^>]*>", re.IGNORECASE)


def _keep_attribute(tag: str, attribute: str, value: str) -> str | None:
    if tag == "a" and attribute == "href" and not _ABSOLUTE.match(value.strip()):
        return None
    return value


def render(text: str) -> str:
    """Markdown to sanitised HTML (safe to mark safe in a template)."""
    html = markdown.markdown(
        text,
        extensions=["fenced_code", "tables", "sane_lists", "toc"],
        extension_configs={"toc": {"baselevel": HEADING_BASE}},
        output_format="html",
    )
    # Markdown's own images become their alt text before sanitising (nh3 would drop them
    # whole); the alt text is escaped again by nh3 like any other text.
    html = _IMAGE.sub(lambda match: match.group(1), html)
    return nh3.clean(
        html,
        tags=ALLOWED_TAGS,
        attributes=ALLOWED_ATTRIBUTES,
        url_schemes=URL_SCHEMES,
        link_rel=LINK_REL,
        attribute_filter=_keep_attribute,
        strip_comments=True,
    )
