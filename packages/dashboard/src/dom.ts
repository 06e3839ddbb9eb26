// The only way this page makes elements: text always goes in as text nodes
// (never innerHTML), so a guest's file names, output or hostnames cannot become
// markup or script. Attributes are set one by one, and event handlers only from code.

type Child = Node | string | number | null | undefined | false;
type Attrs = Record<string, string | number | boolean | undefined | null>;

export function h<K extends keyof HTMLElementTagNameMap>(tag: K, attrs: Attrs = {}, ...children: Child[]): HTMLElementTagNameMap[K] {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    // No handler attributes and no javascript: URLs, whatever a caller passes.
    if (/^on/i.test(name)) throw new Error(`refusing the attribute ${name}: handlers are added with addEventListener`);
    if ((name === "href" || name === "src") && /^\s*javascript:/i.test(String(value))) throw new Error(`refusing a javascript: ${name}`);
    el.setAttribute(name, value === true ? "" : String(value));
  }
  append(el, ...children);
  return el;
}

function append(el: Node, ...children: Child[]): void {
  for (const c of children) {
    if (c === null || c === undefined || c === false) continue;
    el.appendChild(typeof c === "string" || typeof c === "number" ? document.createTextNode(String(c)) : c);
  }
}

export function clear(el: Node): void {
  while (el.firstChild) el.removeChild(el.firstChild);
}

export function button(label: string, onClick: () => void | Promise<void>, attrs: Attrs = {}): HTMLButtonElement {
  const b = h("button", { type: "button", ...attrs }, label);
  b.addEventListener("click", () => {
    const r = onClick();
    if (r instanceof Promise) r.catch((e: unknown) => notify(errorText(e), "error"));
  });
  return b;
}

export function errorText(e: unknown): string {
  return e instanceof Error ? e.message : String(e);
}

let notices: HTMLElement | undefined;
/** A status line read out by screen readers (role=status / alert). */
export function notify(text: string, kind: "info" | "error" = "info"): void {
  notices ??= document.getElementById("notices") ?? undefined;
  if (!notices) return;
  const line = h("p", { class: `notice ${kind}`, role: kind === "error" ? "alert" : "status" }, text);
  notices.prepend(line);
  while (notices.childElementCount > 4) notices.lastElementChild?.remove();
  setTimeout(() => line.remove(), kind === "error" ? 15_000 : 6_000);
}

export function bytes(n: number | null | undefined): string {
  if (n === null || n === undefined || !Number.isFinite(n)) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let v = n;
  let i = 0;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i += 1;
  }
  return `${v >= 100 || i === 0 ? Math.round(v) : v.toFixed(1)} ${units[i]}`;
}

export function duration(ms: number): string {
  if (ms < 0) return "–";
  const s = Math.floor(ms / 1000);
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m ${s % 60}s`;
  return `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m`;
}
