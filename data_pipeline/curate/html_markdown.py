"""A small HTML -> markdown converter for Stack Exchange / wikiHow bodies (LIMA §2.1).

Keeps what carries meaning in an answer: paragraphs, code (``` fenced blocks for <pre>, `inline`),
lists ("- " / "1. "), headings, emphasis, block quotes. Links become their text; images are dropped.
"""
from __future__ import annotations

import re
from html.parser import HTMLParser

_BLOCKS = {"p", "div", "blockquote", "ul", "ol", "pre", "h1", "h2", "h3", "h4", "h5", "h6", "table", "hr"}


class _Converter(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.out: list[str] = []
        self.lists: list[list] = []      # stack of [kind, counter]
        self.pre = 0                     # inside <pre>
        self.quote = 0                   # blockquote depth
        self.links = 0                   # number of <a> elements seen
        self.link_text: list[str] = []   # text inside links
        self.in_link = 0
        self.after_marker = False        # just wrote a list marker, no text yet

    # -- helpers ----------------------------------------------------------------------------------
    def _break(self, blank: bool = True) -> None:
        self.out.append("\n\n" if blank else "\n")

    def handle_starttag(self, tag, attrs):
        if tag in ("p", "div", "table", "h1", "h2", "h3", "h4", "h5", "h6") and not self.pre:
            if not self.after_marker:  # <li><p>text</p></li>: the text follows the list marker
                self._break()
            if tag[0] == "h" and tag[1:].isdigit():
                self.out.append("#" * int(tag[1:]) + " ")
        elif tag == "pre":
            self._break()
            self.out.append("```\n")
            self.pre += 1
        elif tag == "code" and not self.pre:
            self.out.append("`")
        elif tag in ("ul", "ol"):
            if not self.lists:
                self._break()
            self.lists.append([tag, 0])
        elif tag == "li":
            kind = self.lists[-1] if self.lists else ["ul", 0]
            kind[1] += 1
            indent = "  " * max(len(self.lists) - 1, 0)
            marker = f"{kind[1]}. " if kind[0] == "ol" else "- "
            self.out.append(f"\n{indent}{marker}")
            self.after_marker = True
            return
        elif tag == "br":
            self.out.append("\n")
        elif tag == "hr":
            self._break()
            self.out.append("---")
            self._break()
        elif tag in ("strong", "b"):
            self.out.append("**")
        elif tag in ("em", "i"):
            self.out.append("*")
        elif tag == "blockquote":
            self._break()
            self.quote += 1
            self.out.append("\x00QUOTE_START\x00")
        elif tag == "a":
            self.links += 1
            self.in_link += 1
            self.link_text.append("")
        # img, and any other tag: dropped, its text (if any) kept

    def handle_endtag(self, tag):
        if tag == "pre" and self.pre:
            self.pre -= 1
            if not "".join(self.out[-1:]).endswith("\n"):
                self.out.append("\n")
            self.out.append("```")
            self._break()
        elif tag == "code" and not self.pre:
            self.out.append("`")
        elif tag in ("ul", "ol") and self.lists:
            self.lists.pop()
            self._break(blank=not self.lists)
        elif tag in ("strong", "b"):
            self.out.append("**")
        elif tag in ("em", "i"):
            self.out.append("*")
        elif tag == "a" and self.in_link:
            self.in_link -= 1
        elif tag == "blockquote" and self.quote:
            self.quote -= 1
            self.out.append("\x00QUOTE_END\x00")
            self._break()
        elif tag in ("p", "div", "table", "h1", "h2", "h3", "h4", "h5", "h6") and not self.pre:
            self._break()

    def handle_data(self, data):
        if self.after_marker and not self.pre:
            data = data.lstrip()
        if data.strip():
            self.after_marker = False
        if self.in_link:
            self.link_text[-1] += data
        if self.pre:
            self.out.append(data)
        else:
            self.out.append(re.sub(r"\s+", " ", data))


def _quote_blocks(text: str) -> str:
    def repl(m):
        body = m.group(1).strip("\n ")
        return "\n".join("> " + line if line.strip() else ">" for line in body.split("\n"))
    while "\x00QUOTE_START\x00" in text:
        text = re.sub(r"\x00QUOTE_START\x00((?:(?!\x00QUOTE_START\x00).)*?)\x00QUOTE_END\x00", repl, text,
                      flags=re.S)
    return text


def html_to_markdown(html: str) -> str:
    conv = _Converter()
    conv.feed(html)
    conv.close()
    text = _quote_blocks("".join(conv.out))
    # Tidy whitespace outside code blocks: no trailing spaces, at most one blank line.
    parts = re.split(r"(```.*?```)", text, flags=re.S)
    for i in range(0, len(parts), 2):
        p = re.sub(r"(?<=\S) {2,}", " ", parts[i])  # a dropped <img> leaves two spaces
        p = re.sub(r"[ \t]+\n", "\n", p)
        p = re.sub(r"\n[ \t]+(?=[^-\d \t])", "\n", p)
        parts[i] = re.sub(r"\n{3,}", "\n\n", p)
    return re.sub(r"\n{3,}", "\n\n", "".join(parts)).strip()


def link_stats(html: str) -> tuple[int, int, int]:
    """(number of links, characters of link text, characters of all text) of an HTML body."""
    conv = _Converter()
    conv.feed(html)
    conv.close()
    text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html)).strip()
    return conv.links, sum(len(t.strip()) for t in conv.link_text), len(text)
