// The snapshot tree: snapshots and their descendants (parent → child layers),
// BRANCHes drawn from the sandbox they were taken of, and live sandboxes hanging
// off the snapshot they were forked from. Drawn by cytoscape on a canvas, so
// every label is painted text, never markup. A list beside it gives the same
// tree to the keyboard and to screen readers.
import cytoscape, { type Core, type ElementDefinition } from "cytoscape";
import type { Sandbox, Snapshot } from "./api.js";
import { h } from "./dom.js";

export type Selection = { kind: "snapshot"; tag: string } | { kind: "sandbox"; id: string };

/** A snapshot's layer kind as drawn: a live capture, a diff layer, or a full image. */
export function layerKind(s: Snapshot): "live" | "diff" | "full" {
  if (s.mode === "live") return "live";
  return s.storage === "diff" || s.mode === "diff" ? "diff" : "full";
}

/** Layers to assemble from the nearest full image (0 for a full one). */
export function chainDepth(tag: string, byTag: Map<string, Snapshot>): number {
  let depth = 0;
  let at = byTag.get(tag);
  const seen = new Set<string>();
  while (at && layerKind(at) !== "full" && at.parent && !seen.has(at.tag)) {
    seen.add(at.tag);
    depth += 1;
    at = byTag.get(at.parent);
  }
  return depth;
}

const STYLE: cytoscape.StylesheetJson = [
  {
    selector: "node",
    style: {
      label: "data(label)",
      "font-size": 11,
      "text-valign": "bottom",
      "text-margin-y": 4,
      color: "#1b1f24",
      "text-wrap": "ellipsis",
      "text-max-width": "140px",
      "border-width": 2,
      "border-color": "#1b1f24",
      width: 26,
      height: 26,
    },
  },
  { selector: "node.snapshot", style: { shape: "round-rectangle", "background-color": "#3b6fb6" } },
  { selector: "node.diff", style: { "background-color": "#7aa7e0" } },
  { selector: "node.live", style: { shape: "diamond", "background-color": "#8b5cf6" } },
  { selector: "node.writing", style: { "border-style": "dashed", "background-color": "#e0c05a" } },
  { selector: "node.failed", style: { "background-color": "#c0392b" } },
  { selector: "node.sandbox", style: { shape: "ellipse", "background-color": "#2e8b57", width: 18, height: 18, "font-size": 9 } },
  { selector: "node.unhealthy", style: { "background-color": "#d7263d", "border-color": "#7a0010", "border-width": 3 } },
  { selector: "node:selected", style: { "border-color": "#ff8c00", "border-width": 4 } },
  {
    selector: "edge",
    style: {
      width: 2,
      "line-color": "#8a94a3",
      "target-arrow-shape": "triangle",
      "target-arrow-color": "#8a94a3",
      "curve-style": "bezier",
    },
  },
  { selector: "edge.runs", style: { "line-style": "dotted", "target-arrow-shape": "none" } },
  { selector: "edge.branch", style: { "line-style": "dashed", "line-color": "#8b5cf6", "target-arrow-color": "#8b5cf6" } },
];

export class TreeView {
  private readonly cy: Core;
  private shape = "";
  readonly list: HTMLElement;

  constructor(
    container: HTMLElement,
    private readonly onSelect: (s: Selection) => void,
  ) {
    this.cy = cytoscape({ container, style: STYLE, elements: [], minZoom: 0.2, maxZoom: 1.6 });
    this.cy.on("tap", "node", (e) => {
      const id = String(e.target.id());
      this.onSelect(id.startsWith("snap:") ? { kind: "snapshot", tag: id.slice(5) } : { kind: "sandbox", id: id.slice(3) });
    });
    this.list = h("ul", { class: "tree-list", "aria-label": "Snapshots and their sandboxes" });
  }

  update(snapshots: Snapshot[], sandboxes: Sandbox[]): void {
    const byTag = new Map(snapshots.map((s) => [s.tag, s]));
    const liveIds = new Set(sandboxes.map((s) => s.id));
    const els: ElementDefinition[] = [];
    for (const s of snapshots) {
      const kind = layerKind(s);
      els.push({ group: "nodes", data: { id: `snap:${s.tag}`, label: s.tag }, classes: `snapshot ${kind} ${s.status}` });
    }
    for (const s of snapshots) {
      if (s.parent && byTag.has(s.parent)) {
        els.push({ group: "edges", data: { id: `e:${s.parent}>${s.tag}`, source: `snap:${s.parent}`, target: `snap:${s.tag}` } });
      }
    }
    for (const sb of sandboxes) {
      els.push({ group: "nodes", data: { id: `sb:${sb.id}`, label: sb.id }, classes: `sandbox ${sb.health}` });
      if (sb.snapshot_tag && byTag.has(sb.snapshot_tag)) {
        els.push({ group: "edges", data: { id: `r:${sb.id}`, source: `snap:${sb.snapshot_tag}`, target: `sb:${sb.id}` }, classes: "runs" });
      }
    }
    // A BRANCH whose source still runs: drawn from that sandbox to the snapshot it became.
    for (const s of snapshots) {
      if (s.branched_from && liveIds.has(s.branched_from)) {
        els.push({
          group: "edges",
          data: { id: `b:${s.tag}`, source: `sb:${s.branched_from}`, target: `snap:${s.tag}` },
          classes: "branch",
        });
      }
    }
    const shape = els.map((e) => `${e.data.id}|${e.classes ?? ""}`).join(",");
    if (shape !== this.shape) {
      const selected = this.cy.$(":selected").map((n) => n.id());
      this.cy.batch(() => {
        this.cy.elements().remove();
        this.cy.add(els);
      });
      for (const id of selected) this.cy.getElementById(id).select();
      const roots = snapshots.filter((s) => !s.parent || !byTag.has(s.parent)).map((s) => `snap:${s.tag}`);
      this.cy
        .layout({ name: "breadthfirst", directed: true, spacingFactor: 0.9, roots: roots.length ? roots : undefined, animate: false })
        .run();
      this.shape = shape;
    }
    this.renderList(snapshots, sandboxes, byTag);
  }

  select(sel: Selection): void {
    this.cy.$(":selected").unselect();
    this.cy.getElementById(sel.kind === "snapshot" ? `snap:${sel.tag}` : `sb:${sel.id}`).select();
  }

  resize(): void {
    this.cy.resize();
    this.cy.fit(undefined, 20);
  }

  private renderList(snapshots: Snapshot[], sandboxes: Sandbox[], byTag: Map<string, Snapshot>): void {
    const children = new Map<string, Snapshot[]>();
    for (const s of snapshots) {
      const key = s.parent && byTag.has(s.parent) ? s.parent : "";
      children.set(key, [...(children.get(key) ?? []), s]);
    }
    const runsOn = new Map<string, Sandbox[]>();
    for (const sb of sandboxes) runsOn.set(sb.snapshot_tag ?? "", [...(runsOn.get(sb.snapshot_tag ?? "") ?? []), sb]);
    const item = (s: Snapshot, seen: Set<string>): HTMLElement => {
      const kids = seen.has(s.tag) ? [] : (children.get(s.tag) ?? []);
      seen.add(s.tag);
      const pick = h("button", { type: "button", class: "linklike", "data-node": `snap:${s.tag}` }, s.tag);
      pick.addEventListener("click", () => this.onSelect({ kind: "snapshot", tag: s.tag }));
      const sub = h("ul", {});
      for (const sb of runsOn.get(s.tag) ?? []) {
        const b = h("button", { type: "button", class: "linklike", "data-node": `sb:${sb.id}` }, sb.id);
        b.addEventListener("click", () => this.onSelect({ kind: "sandbox", id: sb.id }));
        sub.append(h("li", { class: `sandbox ${sb.health}` }, "sandbox ", b, sb.health === "unhealthy" ? " (unhealthy)" : ""));
      }
      for (const k of kids) sub.append(item(k, seen));
      return h("li", {}, pick, ` ${layerKind(s)}${s.status !== "ready" ? `, ${s.status}` : ""}`, sub.childElementCount ? sub : null);
    };
    const seen = new Set<string>();
    this.list.replaceChildren(...(children.get("") ?? []).map((s) => item(s, seen)));
  }
}
