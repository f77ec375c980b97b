"""A Markdown report -> one standalone HTML file that opens in any browser, its images inline.

Plain data: imports no torch (from mixq only ``artifacts`` and the ``ReportError`` of ``report``).
Every local image the Markdown references (``![alt](drops.png)``, paths relative to the Markdown
file) is embedded as a ``data:`` URI, so the HTML is one file that can be mailed or opened anywhere;
links to other local files stay relative links (rewritten when the HTML goes to another folder).
Nothing is fetched from the network: the CSS is embedded and there is no script.

    render_html("reports/scan_minilm/report.md")  # -> reports/scan_minilm/report.html

Images written as raw HTML inside the Markdown (``<img src=...>``) are passed through untouched.
"""
from __future__ import annotations

import base64
import html
import os
import posixpath
import sys
from pathlib import Path
from typing import Optional
from urllib.parse import unquote, urlsplit
from xml.etree import ElementTree

import markdown

if __package__ in (None, ""):  # run as a script (python mixq/report_html.py): make the mixq package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mixq.artifacts import write_atomic  # noqa: E402
from mixq.report import ReportError  # noqa: E402

IMAGE_MIME = {".png": "image/png", ".svg": "image/svg+xml", ".jpg": "image/jpeg", ".jpeg": "image/jpeg",
              ".gif": "image/gif", ".webp": "image/webp"}

CSS = """
body { max-width: 52rem; margin: 2rem auto; padding: 0 1rem; line-height: 1.5;
       font-family: system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color: #222; }
h1, h2, h3 { line-height: 1.25; }
table { border-collapse: collapse; margin: 1rem 0; font-size: 0.92em; }
th, td { border: 1px solid #bbb; padding: 0.25rem 0.6rem; }
th { background: #f0f0f0; }
tr:nth-child(even) td { background: #fafafa; }
code { font-family: ui-monospace, Menlo, Consolas, monospace; background: #f4f4f4; padding: 0 0.2em; }
pre { background: #f4f4f4; padding: 0.7rem 1rem; overflow-x: auto; }
pre code { padding: 0; background: none; }
img { max-width: 100%; height: auto; }
"""


def _local_path(url: str) -> Optional[str]:
    """The file path of a relative URL (percent-decoded), or None for a URL with a scheme, host or only a fragment."""
    parts = urlsplit(url)
    if parts.scheme or parts.netloc or not parts.path or url.startswith(("/", "#")):
        return None
    return unquote(parts.path)


def _data_uri(image: Path, md_path: Path) -> str:
    mime = IMAGE_MIME.get(image.suffix.lower())
    if mime is None:
        raise ReportError(f"image {str(image)!r} referenced by {str(md_path)!r} has the extension {image.suffix!r}; "
                          f"inlined images must be one of {sorted(IMAGE_MIME)}.")
    if not image.is_file():
        raise ReportError(f"image {str(image)!r} referenced by {str(md_path)!r} does not exist; "
                          f"write it first or remove the reference.")
    return f"data:{mime};base64,{base64.b64encode(image.read_bytes()).decode('ascii')}"


class _Localize(markdown.treeprocessors.Treeprocessor):
    """Inlines local images as data: URIs and re-bases relative links onto the HTML file's folder."""

    def __init__(self, md: markdown.Markdown, md_path: Path, html_dir: Path):
        super().__init__(md)
        self.md_path, self.html_dir = md_path, html_dir
        self.first_h1: Optional[str] = None

    def run(self, root: ElementTree.Element) -> None:
        base = self.md_path.parent
        h1 = next(root.iter("h1"), None)
        self.first_h1 = ("".join(h1.itertext()).strip() or None) if h1 is not None else None
        for img in root.iter("img"):
            rel = _local_path(img.get("src", ""))
            if rel is not None:
                img.set("src", _data_uri(base / rel, self.md_path))
        if base.resolve() == self.html_dir.resolve():
            return
        for a in root.iter("a"):
            href = a.get("href", "")
            rel = _local_path(href)
            if rel is not None:
                frag = urlsplit(href).fragment
                new = Path(os.path.relpath(base.resolve() / rel, self.html_dir.resolve())).as_posix()
                a.set("href", posixpath.normpath(new) + (f"#{frag}" if frag else ""))


class _LocalizeExtension(markdown.extensions.Extension):
    def __init__(self, md_path: Path, html_dir: Path):
        super().__init__()
        self.md_path, self.html_dir = md_path, html_dir
        self.processor: Optional[_Localize] = None

    def extendMarkdown(self, md: markdown.Markdown) -> None:  # noqa: N802 (the markdown package's name)
        # priority -1: after the inline processor (20) has turned ![alt](src) into <img> elements and after
        # the unescape processor (0) has restored backslash-escaped characters (the title reads them)
        self.processor = _Localize(md, self.md_path, self.html_dir)
        md.treeprocessors.register(self.processor, "mixq_localize", -1)


def render_html(md_path: str | os.PathLike, html_path: str | os.PathLike | None = None,
                title: Optional[str] = None) -> Path:
    """Render a Markdown file to one standalone HTML file with its local images inline.

    Args:
        md_path: the Markdown file (UTF-8); image paths in it are relative to its folder.
        html_path: where to write the HTML; default ``md_path`` with the suffix ``.html``.
        title: the page's ``<title>``; default the text of the first ``#`` heading, else the file's stem.

    Returns:
        ``html_path`` as a ``Path``.

    Raises:
        ReportError: the Markdown file does not exist, or an image it references is missing or not one of
            the inlinable types (checked before anything is written).
        OSError: the HTML file cannot be written.
    """
    src = Path(md_path)
    if not src.is_file():
        raise ReportError(f"Markdown file {str(src)!r} does not exist; write the report first.")
    out = Path(html_path) if html_path is not None else src.with_suffix(".html")
    if out.resolve() == src.resolve():
        raise ReportError(f"html_path {str(out)!r} is the Markdown file itself; choose another path.")
    local = _LocalizeExtension(src, out.parent)
    md = markdown.Markdown(extensions=["tables", "fenced_code", local], output_format="html")
    body = md.convert(src.read_text(encoding="utf-8"))
    page_title = title if title is not None else (local.processor.first_h1 or src.stem)
    page = (f"<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>{html.escape(page_title)}</title>\n<style>{CSS}</style>\n</head>\n"
            f"<body>\n{body}\n</body>\n</html>\n")
    return write_atomic(out, page)


def main(argv: Optional[list[str]] = None) -> int:
    """``python mixq/report_html.py REPORT.md [OUT.html]``: print the HTML's path, or the error (exit 2)."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) not in (1, 2):
        print("usage: python mixq/report_html.py REPORT.md [OUT.html]", file=sys.stderr)
        return 2
    try:
        print(render_html(*args))
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
