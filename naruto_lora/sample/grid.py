"""Labelled image grids (PIL only): a title, one label per column and per row, the images."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

PAD = 4
BACKGROUND = (255, 255, 255)
INK = (0, 0, 0)


@dataclass(frozen=True)
class Grid:
    image: Image.Image
    boxes: list[list[tuple[int, int, int, int]]]  # [row][column] -> (left, top, right, bottom)


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> list[str]:
    """Greedy word wrap to ``width`` pixels (a word longer than a line gets a line of its own)."""
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines or [""]


def make_grid(
    cells: Sequence[Sequence[Image.Image]],
    column_labels: Sequence[str],
    row_labels: Sequence[str],
    title: str,
) -> Grid:
    """Rows x columns of same-size images under ``title``; labels above columns, left of rows."""
    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    cell_w, cell_h = cells[0][0].size
    left, top, right, bottom = probe.textbbox((0, 0), "Ag", font=font)
    line_h = bottom - top + PAD
    col_w = max(cell_w, *(int(probe.textlength(t, font=font)) + 2 * PAD for t in column_labels))
    label_w = max(int(probe.textlength(t, font=font)) for t in row_labels) + 2 * PAD
    width = label_w + len(column_labels) * col_w + PAD
    title_lines = _wrap(probe, title, font, width - 2 * PAD)
    header_h = PAD + len(title_lines) * line_h + line_h
    height = header_h + len(cells) * (cell_h + PAD)

    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(title_lines):
        draw.text((PAD, PAD + i * line_h), line, fill=INK, font=font)
    for c, label in enumerate(column_labels):
        x = label_w + c * col_w + (col_w - draw.textlength(label, font=font)) / 2
        draw.text((x, header_h - line_h), label, fill=INK, font=font)
    boxes = []
    for r, row in enumerate(cells):
        y = header_h + r * (cell_h + PAD)
        draw.text((PAD, y + (cell_h - line_h) / 2), row_labels[r], fill=INK, font=font)
        row_boxes = []
        for c, image in enumerate(row):
            x = label_w + c * col_w + (col_w - cell_w) // 2
            canvas.paste(image.convert("RGB"), (x, y))
            row_boxes.append((x, y, x + cell_w, y + cell_h))
        boxes.append(row_boxes)
    return Grid(image=canvas, boxes=boxes)
