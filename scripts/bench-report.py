#!/usr/bin/env python3
"""Turns one `cargo bench` run (criterion's target/criterion/**/new/estimates.json) into the
tables of BENCHMARKS.md and the plot docs/latency-vs-rows.svg. Standard library only.
A group that was not run (`cargo bench ... -- hit_path` runs one) is left out of the tables."""
import json
import pathlib
import sys

root = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "target/criterion")


def median_ns(*parts):
    path = root.joinpath(*parts, "new", "estimates.json")
    return json.loads(path.read_text())["median"]["point_estimate"]


def us(ns):
    return f"{ns / 1000:.1f}"


def ran(group):
    return root.joinpath(group).exists()


out = []
out.append("### Hit path against the floor (one GET of the same bytes, decoded)\n")
out.append("| rows | memclone hit (µs) | floor (µs) | ratio | near hit (µs) | in-process hit (µs) | near / in-process | PostgreSQL (µs) |")
out.append("|---:|---:|---:|---:|---:|---:|---:|---:|")
series = {"postgres": [], "memclone": [], "floor": [], "memory_store": [], "near": []}
for rows in (1, 100, 1000):
    hit = median_ns("hit_path", "memclone", str(rows))
    floor = median_ns("hit_path", "floor", str(rows))
    mem = median_ns("hit_path", "memory_store", str(rows))
    near = median_ns("hit_path", "near", str(rows))
    pg = median_ns("hit_path", "postgres", str(rows))
    for name, value in (("postgres", pg), ("memclone", hit), ("floor", floor), ("memory_store", mem), ("near", near)):
        series[name].append((rows, value))
    out.append(f"| {rows} | {us(hit)} | {us(floor)} | {hit / floor:.2f}× | {us(near)} | {us(mem)} | {near / mem:.2f}× | {us(pg)} |")

database = ["\n### Against the database\n"]
database.append("| read | PostgreSQL (µs) | memclone hit (µs) | speed-up |")
database.append("|---|---:|---:|---:|")
for read in ("pk_lookup", "filter_100", "heavy_join") if ran("database") else ():
    pg = median_ns("database", f"{read}_postgres") if root.joinpath("database", f"{read}_postgres").exists() else median_ns("database", read, "postgres")
    mc = median_ns("database", f"{read}_memclone") if root.joinpath("database", f"{read}_memclone").exists() else median_ns("database", read, "memclone")
    database.append(f"| {read} | {us(pg)} | {us(mc)} | {pg / mc:.0f}× |")
if ran("database"):
    out += database

if ran("alternative"):
    out.append("\n### Against the `cached` crate (AsyncRedisCache, same Redis, same rows)\n")
    out.append("| rows | memclone hit (µs) | cached crate hit (µs) | ratio |")
    out.append("|---:|---:|---:|---:|")
    for rows in (1, 100, 1000):
        mc = median_ns("alternative", "memclone", str(rows))
        other = median_ns("alternative", "cached_crate", str(rows))
        out.append(f"| {rows} | {us(mc)} | {us(other)} | {mc / other:.2f}× |")

if ran("writes"):
    out.append("\n### Invalidating writes\n")
    out.append("| cached queries on the table | invalidating update (µs) | bare update (µs) | overhead (µs) |")
    out.append("|---:|---:|---:|---:|")
    bare = median_ns("writes", "bare_update")
    overheads = {}
    for n in (1, 1000, 100000):
        w = median_ns("writes", "invalidating_update", str(n))
        overheads[n] = w - bare
        out.append(f"| {n:,} | {us(w)} | {us(bare)} | {us(w - bare)} |")
    out.append(f"\nOverhead with 100,000 cached queries / with 1: {overheads[100000] / overheads[1]:.2f}×.")

if ran("throughput"):
    out.append("\n### Throughput (hits per second, 2 cores)\n")
    out.append("| concurrent tasks | hits/s |")
    out.append("|---:|---:|")
    for tasks in (1, 16, 64):
        ns = median_ns("throughput", "hits", str(tasks))
        hits = tasks * 200
        out.append(f"| {tasks} | {hits / (ns / 1e9):,.0f} |")
print("\n".join(out))

# The plot: log-log latency against rows.
width, height, left, right, top, bottom = 860, 420, 70, 250, 30, 50
import math
values = [v for s in series.values() for _, v in s]
lo, hi = math.log10(min(values) / 1000) - 0.1, math.log10(max(values) / 1000) + 0.1
def x(rows):
    return left + (math.log10(rows) / 3) * (width - left - right)
def y(ns):
    return top + (1 - (math.log10(ns / 1000) - lo) / (hi - lo)) * (height - top - bottom)
colors = {"postgres": "#c0392b", "memclone": "#2471a3", "memory_store": "#229954", "floor": "#7f8c8d", "near": "#8e44ad"}
labels = {"postgres": "PostgreSQL (uncached)", "memclone": "memclone hit (Redis)", "memory_store": "memclone hit (in-process store)", "floor": "floor: one Redis GET + decode", "near": "memclone hit (near tier)"}
svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">',
       f'<rect width="{width}" height="{height}" fill="white"/>',
       f'<text x="{left}" y="18" font-size="14">Median latency against result size (log-log)</text>']
for decade in range(math.floor(lo), math.ceil(hi) + 1):
    if lo <= decade <= hi:
        yy = y(10 ** decade * 1000)
        svg.append(f'<line x1="{left}" x2="{width - right}" y1="{yy:.1f}" y2="{yy:.1f}" stroke="#ddd"/>')
        svg.append(f'<text x="{left - 8}" y="{yy + 4:.1f}" text-anchor="end">{10 ** decade:g} µs</text>')
for rows in (1, 100, 1000):
    xx = x(rows)
    svg.append(f'<line x1="{xx:.1f}" x2="{xx:.1f}" y1="{top}" y2="{height - bottom}" stroke="#eee"/>')
    svg.append(f'<text x="{xx:.1f}" y="{height - bottom + 18}" text-anchor="middle">{rows} row{"s" if rows > 1 else ""}</text>')
for i, (name, points) in enumerate(series.items()):
    path = " ".join(f"{x(r):.1f},{y(v):.1f}" for r, v in points)
    dash = ' stroke-dasharray="4 3"' if name == "floor" else ""
    svg.append(f'<polyline points="{path}" fill="none" stroke="{colors[name]}" stroke-width="2"{dash}/>')
    for r, v in points:
        svg.append(f'<circle cx="{x(r):.1f}" cy="{y(v):.1f}" r="3" fill="{colors[name]}"/>')
    ly = top + 20 + i * 20
    svg.append(f'<line x1="{width - right + 10}" x2="{width - right + 30}" y1="{ly}" y2="{ly}" stroke="{colors[name]}" stroke-width="2"{dash}/>')
    svg.append(f'<text x="{width - right + 35}" y="{ly + 4}" font-size="11">{labels[name]}</text>')
svg.append("</svg>")
pathlib.Path("docs").mkdir(exist_ok=True)
pathlib.Path("docs/latency-vs-rows.svg").write_text("\n".join(svg) + "\n")
