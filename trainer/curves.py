"""PNG of the training curves (loss and validation Dice), drawn with Pillow."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75)]


def _panel(
    draw: ImageDraw.ImageDraw,
    box: tuple[int, int, int, int],
    title: str,
    series: dict[str, list[tuple[float, float]]],
    ylim: tuple[float, float] | None = None,
) -> None:
    x0, y0, x1, y1 = box
    draw.rectangle(box, outline=(0, 0, 0))
    draw.text((x0 + 5, y0 - 14), title, fill=(0, 0, 0))
    pts = [p for s in series.values() for p in s]
    if not pts:
        return
    xmin, xmax = min(p[0] for p in pts), max(p[0] for p in pts)
    if ylim is None:
        ys = sorted(p[1] for p in pts)
        ylim = (ys[0], ys[int(0.98 * (len(ys) - 1))] if len(ys) > 10 else ys[-1])
    ymin, ymax = ylim
    xmax = xmax if xmax > xmin else xmin + 1
    ymax = ymax if ymax > ymin else ymin + 1

    def xy(p: tuple[float, float]) -> tuple[float, float]:
        y = min(max(p[1], ymin), ymax)
        return (x0 + (p[0] - xmin) / (xmax - xmin) * (x1 - x0), y1 - (y - ymin) / (ymax - ymin) * (y1 - y0))

    for i in range(5):
        v = ymin + (ymax - ymin) * i / 4
        yy = y1 - (y1 - y0) * i / 4
        draw.line([(x0, yy), (x1, yy)], fill=(225, 225, 225))
        draw.text((x0 - 45, yy - 6), f"{v:.3f}", fill=(0, 0, 0))
    draw.text((x1 - 80, y1 + 4), f"iter {int(xmax)}", fill=(0, 0, 0))
    for k, (name, s) in enumerate(series.items()):
        col = COLOURS[k % len(COLOURS)]
        if len(s) > 1:
            draw.line([xy(p) for p in s], fill=col, width=2)
        elif s:
            cx, cy = xy(s[0])
            draw.ellipse([cx - 2, cy - 2, cx + 2, cy + 2], fill=col)
        draw.text((x0 + 8, y0 + 6 + 13 * k), name, fill=col)


def _smooth(points: list[tuple[float, float]], n: int = 25) -> list[tuple[float, float]]:
    out = []
    for i in range(0, len(points), max(1, n)):
        chunk = points[i : i + n]
        out.append((chunk[-1][0], sum(p[1] for p in chunk) / len(chunk)))
    return out


def write_curves(
    path: Path, loss: list[tuple[float, float]], val: dict[str, list[tuple[float, float]]]
) -> None:
    img = Image.new("RGB", (900, 620), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    _panel(draw, (60, 30, 880, 280), "training loss (mean of 25 iterations)", {"loss": _smooth(loss)})
    _panel(draw, (60, 340, 880, 590), "validation Dice (held-out patients)", val, ylim=(0.0, 1.0))
    img.save(path)
