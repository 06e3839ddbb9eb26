// Small live charts from GET /v1/metrics/summary and the stream's metrics events:
// an SVG polyline per series, the latest value as text beside it.
import type { MetricsSummary } from "./api.js";
import { bytes, h } from "./dom.js";

const SVG = "http://www.w3.org/2000/svg";
const KEEP = 90;

type Series = {
  title: string;
  unit: (v: number) => string;
  values: (m: MetricsSummary) => (number | null)[];
  colors: string[];
  names: string[];
};

const SERIES: Series[] = [
  {
    title: "Fork rate",
    unit: (v) => `${v}/min`,
    values: (m) => [m.forks_per_min],
    colors: ["#3b6fb6"],
    names: ["children restored per minute"],
  },
  {
    title: "Spawn latency",
    unit: (v) => `${Math.round(v)} ms`,
    values: (m) => [m.spawn_p50_ms, m.spawn_p99_ms],
    colors: ["#2e8b57", "#c0392b"],
    names: ["p50", "p99"],
  },
  {
    title: "Host memory used",
    unit: bytes,
    values: (m) => [m.host.mem_total_bytes - m.host.mem_available_bytes],
    colors: ["#8b5cf6"],
    names: ["used"],
  },
  {
    title: "/dev/shm used + reserved",
    unit: bytes,
    values: (m) => [m.host.shm_total_bytes - m.host.shm_free_bytes, m.host.shm_reserved_bytes],
    colors: ["#b8860b", "#555"],
    names: ["used", "reserved"],
  },
];

export class Charts {
  readonly el: HTMLElement;
  private readonly history: MetricsSummary[] = [];

  constructor() {
    this.el = h("div", { class: "charts" });
  }

  push(m: MetricsSummary): void {
    this.history.push(m);
    if (this.history.length > KEEP) this.history.shift();
    this.render();
  }

  private render(): void {
    this.el.replaceChildren(...SERIES.map((s) => this.chart(s)));
  }

  private chart(s: Series): HTMLElement {
    const w = 220;
    const hgt = 60;
    const rows = this.history.map((m) => s.values(m));
    const all = rows.flat().filter((v): v is number => v !== null);
    const max = Math.max(1, ...all);
    const svg = document.createElementNS(SVG, "svg");
    svg.setAttribute("viewBox", `0 0 ${w} ${hgt}`);
    svg.setAttribute("width", String(w));
    svg.setAttribute("height", String(hgt));
    svg.setAttribute("role", "img");
    const latest = rows.at(-1) ?? [];
    const summary = s.names.map((n, i) => `${n} ${latest[i] === null || latest[i] === undefined ? "–" : s.unit(latest[i]!)}`).join(", ");
    svg.setAttribute("aria-label", `${s.title}: ${summary}`);
    s.colors.forEach((color, i) => {
      const pts = rows
        .map((r, x) =>
          r[i] === null || r[i] === undefined ? null : `${(x / Math.max(1, KEEP - 1)) * w},${hgt - 2 - (r[i]! / max) * (hgt - 4)}`,
        )
        .filter((p): p is string => p !== null);
      const line = document.createElementNS(SVG, "polyline");
      line.setAttribute("points", pts.join(" "));
      line.setAttribute("fill", "none");
      line.setAttribute("stroke", color);
      line.setAttribute("stroke-width", "2");
      svg.appendChild(line);
    });
    return h("figure", { class: "chart" }, h("figcaption", {}, h("strong", {}, s.title), " ", summary), svg);
  }
}
