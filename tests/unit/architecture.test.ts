// ARCHITECTURE.md draws core's folders as a DAG: this keeps the drawing true.
// Each arrow must be a real import between folders, and every real import must
// be an arrow or follow from a longer path of arrows (the transitive reduction).
import fs from "node:fs";
import path from "node:path";
import { describe, expect, it } from "vitest";
import { REPO_ROOT } from "../helpers/env.js";

const CORE_SRC = path.join(REPO_ROOT, "packages/core/src");

function importedFolders(): Map<string, Set<string>> {
  const folders = fs.readdirSync(CORE_SRC).filter((f) => fs.statSync(path.join(CORE_SRC, f)).isDirectory());
  const edges = new Map(folders.map((f) => [f, new Set<string>()]));
  for (const folder of folders) {
    for (const file of fs.readdirSync(path.join(CORE_SRC, folder), { recursive: true }) as string[]) {
      if (!file.endsWith(".ts")) continue;
      const dir = path.dirname(path.join(CORE_SRC, folder, file));
      const source = fs.readFileSync(path.join(CORE_SRC, folder, file), "utf8");
      for (const m of source.matchAll(/from\s+"(\.\.?\/[^"]+)"/g)) {
        const target = path.relative(CORE_SRC, path.resolve(dir, m[1]!)).split(path.sep)[0]!;
        if (target !== folder && edges.has(target)) edges.get(folder)!.add(target);
      }
    }
  }
  return edges;
}

function reachable(edges: Map<string, Set<string>>, from: string, skipDirect: string): boolean {
  const seen = new Set<string>();
  const stack = [...(edges.get(from) ?? [])].filter((n) => n !== skipDirect);
  while (stack.length) {
    const node = stack.pop()!;
    if (node === skipDirect) return true;
    if (seen.has(node)) continue;
    seen.add(node);
    stack.push(...(edges.get(node) ?? []));
  }
  return false;
}

/** The arrows of the mermaid block that draws core's folders (`a --> b & c`). */
function drawnArrows(): Set<string> {
  const doc = fs.readFileSync(path.join(REPO_ROOT, "ARCHITECTURE.md"), "utf8");
  const block = [...doc.matchAll(/```mermaid\n([\s\S]*?)```/g)].map((m) => m[1]!).find((b) => b.includes('common["'));
  if (!block) throw new Error("ARCHITECTURE.md has no mermaid block drawing core's folders");
  const arrows = new Set<string>();
  for (const line of block.split("\n")) {
    const m = /^\s*(\w+)\s*-->\s*(.+)$/.exec(line);
    if (!m || m[2]!.includes("[")) continue;
    for (const to of m[2]!.split("&")) arrows.add(`${m[1]} --> ${to.trim()}`);
  }
  return arrows;
}

describe("ARCHITECTURE.md's picture of core", () => {
  it("draws exactly the imports between core's folders that no longer path implies", () => {
    const edges = importedFolders();
    const reduced = new Set<string>();
    for (const [from, tos] of edges) for (const to of tos) if (!reachable(edges, from, to)) reduced.add(`${from} --> ${to}`);
    expect([...drawnArrows()].sort()).toEqual([...reduced].sort());
  });
});
