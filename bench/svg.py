"""The ratio chart, written as plain SVG: one horizontal bar per case, ubd IOPS / kernel IOPS, with
the parity line (1.0) and the ubd null target (0.5) marked."""
import math
from xml.sax.saxutils import escape

from .cases import BenchCase

COLORS = {"null": "#4e79a7", "loop": "#f28e2b"}
ROW = 22
LABEL_W = 330
PLOT_W = 520
TOP = 58
RIGHT = 70


def _step(vmax):
    return 0.25 if vmax <= 2 else 0.5 if vmax <= 4 else float(10 ** math.floor(math.log10(vmax)))


def _ticks(vmax):
    step = _step(vmax)
    return [round(i * step, 6) for i in range(int(vmax / step + 1e-9) + 1)]


def chart(summary: list, title: str, subtitle: str = "") -> str:
    ratios = [e["ratio"]["iops"] for e in summary if e["ratio"]["iops"] is not None]
    vmax = max([1.25] + [r * 1.1 for r in ratios])
    vmax = math.ceil(vmax / _step(vmax) - 1e-9) * _step(vmax)
    height = TOP + ROW * max(len(summary), 1) + 50
    width = LABEL_W + PLOT_W + RIGHT
    x0 = LABEL_W

    def x(v):
        return x0 + PLOT_W * v / vmax

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
           f'<rect x="0" y="0" width="{width}" height="{height}" fill="white"/>',
           f'<text x="10" y="20" font-size="15" font-weight="bold">{escape(title)}</text>',
           f'<text x="10" y="38" fill="#555">{escape(subtitle)}</text>']
    bottom = TOP + ROW * len(summary)
    for t in _ticks(vmax):
        out.append(f'<line x1="{x(t):.1f}" y1="{TOP - 4}" x2="{x(t):.1f}" y2="{bottom}" stroke="#e3e3e3"/>')
        out.append(f'<text x="{x(t):.1f}" y="{bottom + 16}" text-anchor="middle" fill="#555">{t:g}</text>')
    for i, e in enumerate(summary):
        c = BenchCase.from_dict(e["case"])
        y = TOP + ROW * i
        r = e["ratio"]["iops"]
        out.append(f'<text x="{x0 - 8}" y="{y + ROW * 0.68:.1f}" text-anchor="end">'
                   f'{escape(c.target)} vs {escape(e.get("kernel_driver", ""))}: '
                   f'{escape(c.workload)} {escape(c.engine)} q{c.queues} d{c.iodepth}</text>')
        if r is None:
            out.append(f'<text x="{x0 + 4}" y="{y + ROW * 0.68:.1f}" fill="#c00">failed</text>')
            continue
        out.append(f'<rect x="{x0}" y="{y + 3}" width="{max(x(r) - x0, 1):.1f}" height="{ROW - 6}" '
                   f'fill="{COLORS.get(c.target, "#888")}"><title>{escape(c.id)}: {r:.3f}</title></rect>')
        out.append(f'<text x="{x(r) + 4:.1f}" y="{y + ROW * 0.68:.1f}">{r:.2f}</text>')
    for v, label, dash in ((1.0, "parity", "6,3"), (0.5, "null target", "2,3")):
        out.append(f'<line x1="{x(v):.1f}" y1="{TOP - 8}" x2="{x(v):.1f}" y2="{bottom}" stroke="#c00" '
                   f'stroke-dasharray="{dash}"/>')
        out.append(f'<text x="{x(v):.1f}" y="{TOP - 11}" text-anchor="middle" fill="#c00" '
                   f'font-size="10">{label} {v:g}</text>')
    out.append(f'<line x1="{x0}" y1="{TOP - 4}" x2="{x0}" y2="{bottom}" stroke="#333"/>')
    ly = bottom + 36
    out.append(f'<text x="{x0}" y="{ly}" fill="#333">IOPS ratio ubd / kernel (higher is better)</text>')
    lx = x0 + 300
    for name, color in COLORS.items():
        out.append(f'<rect x="{lx}" y="{ly - 10}" width="12" height="12" fill="{color}"/>')
        out.append(f'<text x="{lx + 16}" y="{ly}">{name}</text>')
        lx += 70
    out.append("</svg>")
    return "\n".join(out) + "\n"
