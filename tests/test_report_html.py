"""The HTML report: one standalone file, images inline, checked in a real headless Chromium.

Chromium comes from Debian's package ``chromium`` (scripts/setup.sh installs it). Without it the browser
test is skipped with the reason; with CI=true it fails, since CI installs it.
"""
from __future__ import annotations

import base64
import html
import io
import json
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from mixq.report import ReportError
from mixq.report_html import render_html

ROOT = Path(__file__).resolve().parents[1]


def png(path: Path, width: int, height: int, color: str = "#1f77b4") -> bytes:
    """A real PNG of exactly width x height pixels, drawn by matplotlib on its Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    dpi = 50
    fig = Figure(figsize=(width / dpi, height / dpi), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot([0, 1, 2], [0, 1, 0], color=color)
    fig.savefig(path, format="png", dpi=dpi)
    return path.read_bytes()


def png_size(data: bytes) -> tuple[int, int]:
    """Width and height from the PNG's IHDR chunk (independent of any image library)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def rgba_sums(data: bytes) -> list[int]:
    """Per-channel sums of the PNG's 8-bit RGBA pixels, decoded by Pillow (matplotlib's image reader)."""
    import numpy as np
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        px = np.asarray(im.convert("RGBA"), dtype=np.int64)
    return [int(v) for v in px.reshape(-1, 4).sum(axis=0)]


def inlined(page: str) -> list[tuple[str, str, bytes]]:
    """(alt, MIME type, decoded bytes) of every <img> with a data: URI, in page order."""
    out = []
    for tag in re.findall(r"<img [^>]*>", page):
        alt = re.search(r'alt="([^"]*)"', tag).group(1)
        m = re.search(r'src="data:([^;"]+);base64,([^"]*)"', tag)
        if m:
            out.append((alt, m.group(1), base64.b64decode(m.group(2), validate=True)))
    return out


REPORT_MD = """# Scan report: toy

Some text with `code` and a [notes file](notes.txt).

## Drops

| layer | format | drop |
|---|---|---|
| attn.q | int8 | 3.10 |
| head | int4_wo | 0.00 |

![drops](drops.png)

## Proxies

![proxies](figs/proxies.png)

```text
mixq scan --task toy
```
"""


@pytest.fixture
def report(tmp_path):
    """A Markdown report with two real PNGs of different sizes, one in a subfolder; returns (md, {alt: bytes})."""
    (tmp_path / "figs").mkdir()
    images = {"drops": png(tmp_path / "drops.png", 300, 150),
              "proxies": png(tmp_path / "figs" / "proxies.png", 200, 250, color="#d62728")}
    md = tmp_path / "report.md"
    md.write_text(REPORT_MD)
    (tmp_path / "notes.txt").write_text("notes")
    return md, images


# ----------------------------------------------------------------------------- unit tests
def test_images_are_inlined_byte_for_byte(report):
    md, images = report
    out = render_html(md)
    assert out == md.with_suffix(".html") and out.is_file()
    got = inlined(out.read_text())
    assert [(alt, mime) for alt, mime, _ in got] == [("drops", "image/png"), ("proxies", "image/png")]
    for alt, _, data in got:
        assert data == images[alt]
    assert png_size(images["drops"]) == (300, 150) and png_size(images["proxies"]) == (200, 250)
    assert "drops.png" not in out.read_text() and "proxies.png" not in out.read_text()


def test_svg_and_jpeg_get_their_mime_types(tmp_path):
    svg = b'<svg xmlns="http://www.w3.org/2000/svg" width="4" height="3"></svg>'
    (tmp_path / "a.svg").write_bytes(svg)
    (tmp_path / "b.JPG").write_bytes(b"\xff\xd8\xff\xe0jpeg")
    (tmp_path / "c.jpeg").write_bytes(b"\xff\xd8\xff\xe0jpeg2")
    md = tmp_path / "r.md"
    md.write_text("![a](a.svg) ![b](b.JPG) ![c](c.jpeg)\n")
    got = inlined(render_html(md).read_text())
    assert got == [("a", "image/svg+xml", svg), ("b", "image/jpeg", b"\xff\xd8\xff\xe0jpeg"),
                   ("c", "image/jpeg", b"\xff\xd8\xff\xe0jpeg2")]


def test_percent_encoded_image_path(tmp_path):
    data = png(tmp_path / "my chart.png", 100, 50)
    md = tmp_path / "r.md"
    md.write_text("![c](my%20chart.png)\n")
    assert inlined(render_html(md).read_text()) == [("c", "image/png", data)]


@pytest.mark.parametrize("ref", ["missing.png", "figs/missing.png"])
def test_missing_image_is_an_error_and_nothing_is_written(report, ref):
    md, _ = report
    md.write_text(REPORT_MD + f"\n![gone]({ref})\n")
    with pytest.raises(ReportError) as e:
        render_html(md)
    assert str(md.parent / ref) in str(e.value) and str(md) in str(e.value)
    assert not md.with_suffix(".html").exists()
    assert sorted(p.name for p in md.parent.iterdir()) == ["drops.png", "figs", "notes.txt", "report.md"]


def test_unknown_image_type_is_an_error_naming_the_valid_ones(tmp_path):
    (tmp_path / "x.bmp").write_bytes(b"BM")
    md = tmp_path / "r.md"
    md.write_text("![x](x.bmp)\n")
    with pytest.raises(ReportError, match=r"x\.bmp.*'\.bmp'.*\.png"):
        render_html(md)
    assert not (tmp_path / "r.html").exists()


def test_missing_markdown_is_an_error(tmp_path):
    with pytest.raises(ReportError, match="nope.md"):
        render_html(tmp_path / "nope.md")


def test_tables_headings_code_and_title(report):
    md, _ = report
    page = render_html(md).read_text()
    assert page.startswith("<!DOCTYPE html>")
    assert "<title>Scan report: toy</title>" in page
    assert re.search(r"<table>\s*<thead>\s*<tr>\s*<th>layer</th>", page)
    assert page.count("<tr>") == 3 and "<td>attn.q</td>" in page
    assert "<h1>Scan report: toy</h1>" in page and "<h2>Drops</h2>" in page
    assert '<pre><code class="language-text">mixq scan --task toy' in page
    assert "<style>" in page and "border-collapse" in page


def test_title_given_or_from_stem_and_escaped(tmp_path):
    md = tmp_path / "plain.md"
    md.write_text("no heading here\n\n## only h2\n")
    assert "<title>plain</title>" in render_html(md).read_text()
    assert "<title>a &lt;b&gt; &amp; c</title>" in render_html(md, title="a <b> & c").read_text()
    md.write_text("# Drops \\*of\\* `int8` & co\n")
    assert "<title>Drops *of* int8 &amp; co</title>" in render_html(md).read_text()


def test_no_external_resources(report):
    md, _ = report
    page = render_html(md).read_text()
    assert "http://" not in page and "https://" not in page
    assert "<link" not in page and "<script" not in page
    for url in re.findall(r'(?:src|href)="([^"]*)"', page):
        assert url.startswith("data:image/png;base64,") or url == "notes.txt", url


def test_user_links_are_kept_and_local_links_rebased(report, tmp_path):
    md, _ = report
    md.write_text(REPORT_MD + "\n[web](https://example.org/x) [top](#drops) [up](figs/proxies.png#z)\n")
    page = render_html(md, tmp_path / "out" / "deep" / "page.html").read_text()
    assert 'href="https://example.org/x"' in page and 'href="#drops"' in page
    assert 'href="../../notes.txt"' in page and 'href="../../figs/proxies.png#z"' in page
    assert len(inlined(page)) == 2
    same = render_html(md).read_text()
    assert 'href="notes.txt"' in same and 'href="figs/proxies.png#z"' in same


def test_html_path_equal_to_markdown_is_refused(report):
    md, _ = report
    before = md.read_text()
    with pytest.raises(ReportError, match="Markdown file itself"):
        render_html(md, md)
    assert md.read_text() == before


def test_report_html_imports_no_torch(tmp_path, report):
    """A plain-data module: renders in an interpreter where torch cannot be imported."""
    md, _ = report
    code = f"""
import sys
class _NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError(name)
sys.meta_path.insert(0, _NoTorch())
from mixq.report_html import render_html
render_html({str(md)!r}, {str(tmp_path / 'x.html')!r})
assert "torch" not in sys.modules
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert len(inlined((tmp_path / "x.html").read_text())) == 2


# ----------------------------------------------------------------------------- real browser
PROBE = """<script>
window.addEventListener("load", function () {
  var out = document.createElement("pre");
  out.id = "mixq-probe";
  out.textContent = JSON.stringify(Array.prototype.map.call(document.images, function (im) {
    // the decoded pixels, summed per channel: a truncated or corrupted image decodes to other sums
    var sums = [0, 0, 0, 0];
    if (im.naturalWidth > 0) {
      var c = document.createElement("canvas");
      c.width = im.naturalWidth; c.height = im.naturalHeight;
      var g = c.getContext("2d");
      g.drawImage(im, 0, 0);
      var px = g.getImageData(0, 0, c.width, c.height).data;
      for (var i = 0; i < px.length; i++) sums[i % 4] += px[i];
    }
    return {alt: im.alt, w: im.naturalWidth, h: im.naturalHeight, complete: im.complete, rgba_sums: sums};
  }));
  document.body.appendChild(out);
});
</script>
"""


def chromium() -> str:
    """Chromium's path, or skip (fail under CI=true, where scripts/setup.sh installs it)."""
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        reason = "Chromium is not installed (apt-get install chromium; scripts/setup.sh does it)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}; it is needed under CI=true")
        pytest.skip(reason)
    return exe


def test_images_decode_in_headless_chromium(report, tmp_path):
    exe = chromium()
    md, images = report
    page = render_html(md).read_text()
    # the HTML must stand alone: the PNGs and the Markdown are gone when the browser opens it
    view = tmp_path / "elsewhere" / "view.html"
    view.parent.mkdir()
    view.write_text(page.replace("</body>", PROBE + "</body>"))
    (md.parent / "drops.png").unlink()
    shutil.rmtree(md.parent / "figs")
    md.unlink()
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
           f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", view.as_uri()]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    except subprocess.TimeoutExpired:
        pytest.fail(f"Chromium did not finish within 90 s: {' '.join(cmd)}")
    dom = res.stdout
    assert res.returncode == 0, res.stderr[-2000:]
    m = re.search(r'<pre id="mixq-probe">(.*?)</pre>', dom, re.S)
    assert m, f"the probe script did not run; DOM was:\n{dom[:2000]}\nstderr:\n{res.stderr[-2000:]}"
    seen = json.loads(html.unescape(m.group(1)))
    want = [{"alt": alt, "w": png_size(images[alt])[0], "h": png_size(images[alt])[1], "complete": True,
             "rgba_sums": rgba_sums(images[alt])} for alt in ("drops", "proxies")]
    assert seen == want
    assert re.search(r"<table>.*<th>layer</th>.*<td>attn\.q</td>.*</table>", dom, re.S)
    assert "<h1>Scan report: toy</h1>" in dom and "<h2>Proxies</h2>" in dom
    assert "<title>Scan report: toy</title>" in dom
