"""Dragging an image from the page (history, results, the selected image) into "Start from a picture".

A browser drags an ``<img>`` as its address, not as a file, and Gradio's image input takes only
files. This script, run once when the page loads, turns such a drop on the picture input into the
file drop Gradio expects: it fetches the image (the page's own files only, by the user's own
session) and drops it again as a PNG file. The upload then goes through the same checks as any
other (``webapp.uploads``). Drops that already carry files are left to Gradio.
"""

from __future__ import annotations

DROP_TARGET = "#init-image"

DROP_FROM_PAGE_JS = f"""
() => {{
  document.addEventListener("drop", async (event) => {{
    const target = event.target instanceof Element ? event.target.closest("{DROP_TARGET}") : null;
    const carried = event.dataTransfer;
    if (!target || !carried || carried.files.length > 0) return;
    const address = (carried.getData("text/uri-list") || "").split("\\n").find((line) => line && !line.startsWith("#"));
    if (!address) return;
    const url = new URL(address.trim(), window.location.href);
    if (url.origin !== window.location.origin) return;
    event.preventDefault();
    event.stopPropagation();
    const response = await fetch(url, {{ credentials: "same-origin" }});
    if (!response.ok) return;
    const blob = await response.blob();
    const type = blob.type.startsWith("image/") ? blob.type : "image/png";
    const file = new File([blob], `from-this-page.${{type.slice(6)}}`, {{ type }});
    const files = new DataTransfer();
    files.items.add(file);
    event.target.dispatchEvent(new DragEvent("drop", {{ dataTransfer: files, bubbles: true, cancelable: true }}));
  }}, true);
}}
"""
