"""The HTML pieces ``report.html`` (the ``report`` stage) and ``compare.html`` (``selpo compare``) share: the
style sheet, tables and the token heatmap."""

from __future__ import annotations

import html


def _color(score: float, scale: float) -> str:
    """A diverging background: green for positive rewards, red for negative, white at 0."""
    x = max(-1.0, min(1.0, score / scale)) if scale > 0 else 0.0
    fade = int(255 * (1 - abs(x)))
    return f"rgb({fade},255,{fade})" if x >= 0 else f"rgb(255,{fade},{fade})"


def _tokens_html(tokenizer, ids, scores, mask, scale) -> str:
    spans = []
    for token, score, selected in zip(ids, scores, mask):
        text = html.escape(tokenizer.decode([token]))
        style = f"background:{_color(score, scale)}" + (";outline:2px solid #222" if selected else "")
        spans.append(f'<span class="tok" style="{style}" title="{score:+.3f}">{text}</span>')
    return "".join(spans)


def heatmap_html(tokenizer, rows: list[dict]) -> str:
    """Each pair's prompt, then its chosen and rejected response tokens coloured by reward."""
    scale = max((abs(s) for r in rows for s in r["chosen_scores"] + r["rejected_scores"]), default=0.0)
    parts = []
    for r in rows:
        prompt = html.escape(tokenizer.decode(r["prompt_ids"], skip_special_tokens=True))
        parts.append(f'<div class="pair"><div class="prompt">row {r["row"]}: {prompt}</div>')
        for side in ("chosen", "rejected"):
            tokens = _tokens_html(tokenizer, r[f"{side}_ids"], r[f"{side}_scores"], r[f"{side}_mask"], scale)
            parts.append(f'<div class="resp"><b>{side}</b> {tokens}</div>')
        parts.append("</div>")
    return "\n".join(parts)


def table(rows, header) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


STYLE = """body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}
.pair{margin:1em 0;padding:.5em;border:1px solid #ddd}.prompt{color:#777;margin-bottom:.3em}
.resp{margin:.3em 0;line-height:1.9}.tok{white-space:pre-wrap;padding:1px 0}pre{background:#f6f6f6;padding:1em}"""
