// A terminal into a sandbox and its file browser, through the public API only:
// the shell is a background process (exec with background: true) run on a
// pseudo-terminal by the guest's forkd-guestctl; its output is the process's
// NDJSON output stream, keystrokes go to its stdin. Guest output is written to
// xterm (which draws it as terminal text) and file names go in as text nodes.
import { Terminal } from "@xterm/xterm";
import { call, enc, type FileEntry, type ProcessInfo, stream } from "./api.js";
import { button, bytes, clear, errorText, h, notify } from "./dom.js";

const GUESTCTL = "/opt/forkd/bin/forkd-guestctl";

function toBase64(data: Uint8Array): string {
  let s = "";
  for (let i = 0; i < data.length; i += 0x8000) s += String.fromCharCode(...data.subarray(i, i + 0x8000));
  return btoa(s);
}

function fromBase64(text: string): Uint8Array {
  const bin = atob(text);
  const out = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
  return out;
}

export class TerminalPanel {
  readonly el: HTMLElement;
  private readonly screen: HTMLElement;
  private readonly status: HTMLElement;
  private term: Terminal | undefined;
  private session: { id: string; pid: number; abort: AbortController } | undefined;
  /** Keystrokes typed while a call is in flight, sent together by the next one. */
  private pending = "";
  private sending = false;

  constructor() {
    this.screen = h("div", { class: "term-screen" });
    this.status = h("p", { class: "muted", role: "status" }, "No terminal open. Pick a sandbox and choose Terminal.");
    this.el = h("div", {}, this.status, this.screen);
  }

  async open(id: string): Promise<void> {
    await this.close();
    this.term?.dispose();
    const term = new Terminal({ rows: 20, cols: 90, convertEol: false, cursorBlink: true, fontSize: 13, screenReaderMode: true });
    this.term = term;
    clear(this.screen);
    term.open(this.screen);
    const proc = await call<ProcessInfo>("POST", `/v1/sandboxes/${enc(id)}/exec`, {
      argv: [GUESTCTL, "pty", String(term.rows), String(term.cols), "/bin/sh", "-i"],
      env: { TERM: "xterm-256color", HOME: "/root" },
      background: true,
      tag: "dashboard-terminal",
    });
    const abort = new AbortController();
    this.session = { id, pid: proc.pid, abort };
    this.status.replaceChildren(
      `Terminal on ${id} (process ${proc.pid}). `,
      button("Close terminal", () => this.close()),
    );
    term.onData((data) => this.send(id, proc.pid, data));
    term.focus();
    let buffer = "";
    stream(
      `/v1/sandboxes/${enc(id)}/processes/${proc.pid}/output`,
      { method: "GET" },
      (text) => {
        buffer += text;
        let nl = buffer.indexOf("\n");
        while (nl >= 0) {
          const line = buffer.slice(0, nl);
          buffer = buffer.slice(nl + 1);
          nl = buffer.indexOf("\n");
          try {
            const msg = JSON.parse(line) as { type: string; data?: string; exit_code?: number | null };
            if ((msg.type === "stdout" || msg.type === "stderr") && msg.data) term.write(fromBase64(msg.data));
            else if (msg.type === "exit") term.write(`\r\n[shell exited: ${String(msg.exit_code)}]\r\n`);
          } catch {
            // not a line of the stream: skipped
          }
        }
      },
      abort.signal,
    ).catch((e: unknown) => {
      if (!abort.signal.aborted) notify(`terminal: ${errorText(e)}`, "error");
    });
  }

  /** In order, one call at a time (keystrokes must not overtake each other), batching what is typed meanwhile. */
  private send(id: string, pid: number, data: string): void {
    this.pending += data;
    if (this.sending) return;
    this.sending = true;
    const flush = async () => {
      while (this.pending && this.session?.pid === pid) {
        const chunk = new TextEncoder().encode(this.pending);
        this.pending = "";
        await call("POST", `/v1/sandboxes/${enc(id)}/processes/${pid}/stdin`, { data: toBase64(chunk), encoding: "base64" });
      }
    };
    flush()
      .catch((e: unknown) => notify(`terminal input: ${errorText(e)}`, "error"))
      .finally(() => {
        this.sending = false;
        this.pending = "";
      });
  }

  async close(): Promise<void> {
    const s = this.session;
    if (!s) return;
    this.session = undefined;
    s.abort.abort();
    await call("DELETE", `/v1/sandboxes/${enc(s.id)}/processes/${s.pid}`).catch(() => {});
    this.status.replaceChildren(`Terminal on ${s.id} closed.`);
  }
}

export class FilesPanel {
  readonly el: HTMLElement;
  private id: string | undefined;
  private readonly pathInput: HTMLInputElement;
  private readonly listing: HTMLElement;
  private readonly heading: HTMLElement;
  private readonly upload: HTMLInputElement;

  constructor() {
    this.pathInput = h("input", { id: "files-path", type: "text", value: "/tmp", spellcheck: "false", autocomplete: "off" });
    this.upload = h("input", { id: "files-upload", type: "file" });
    this.upload.addEventListener("change", () => {
      this.uploadChosen().catch((e: unknown) => notify(`upload: ${errorText(e)}`, "error"));
    });
    this.listing = h("div", { class: "files-list", "aria-live": "polite" });
    this.heading = h("p", { class: "muted" }, "No sandbox chosen. Pick one and choose Files.");
    const form = h(
      "form",
      { class: "row" },
      h("label", { for: "files-path" }, "Directory"),
      this.pathInput,
      h("button", { type: "submit" }, "List"),
      h("label", { for: "files-upload" }, "Upload a file here"),
      this.upload,
    );
    form.addEventListener("submit", (e) => {
      e.preventDefault();
      this.list().catch((err: unknown) => notify(`list: ${errorText(err)}`, "error"));
    });
    this.el = h("div", {}, this.heading, form, this.listing);
  }

  async show(id: string, dir?: string): Promise<void> {
    this.id = id;
    if (dir) this.pathInput.value = dir;
    this.heading.replaceChildren(`Files of ${id}`);
    await this.list();
  }

  private dir(): string {
    return this.pathInput.value.trim() || "/";
  }

  async list(): Promise<void> {
    if (!this.id) throw new Error("pick a sandbox first");
    const id = this.id;
    const dir = this.dir();
    const res = await call<{ path: string; entries: FileEntry[] }>("POST", `/v1/sandboxes/${enc(id)}/files`, { action: "list", path: dir });
    const rows = res.entries.map((e) => {
      const full = `${dir.replace(/\/$/, "")}/${e.name}`;
      const actions: HTMLElement[] = [];
      if (e.type === "dir") actions.push(button("Open", () => this.show(id, full), { "aria-label": `Open directory ${e.name}` }));
      if (e.type === "file")
        actions.push(button("Download", () => this.download(id, full, e.name), { "aria-label": `Download ${e.name}` }));
      return h("tr", {}, h("td", { class: "mono" }, e.name), h("td", {}, e.type), h("td", {}, bytes(e.size)), h("td", {}, ...actions));
    });
    const up = dir === "/" ? null : button("Up", () => this.show(id, dir.replace(/\/[^/]+\/?$/, "") || "/"));
    this.listing.replaceChildren(
      h("p", {}, `${res.entries.length} entries in `, h("span", { class: "mono" }, res.path), " ", up),
      h(
        "table",
        { class: "files" },
        h(
          "thead",
          {},
          h(
            "tr",
            {},
            h("th", { scope: "col" }, "Name"),
            h("th", { scope: "col" }, "Type"),
            h("th", { scope: "col" }, "Size"),
            h("th", { scope: "col" }, "Actions"),
          ),
        ),
        h("tbody", {}, ...rows),
      ),
    );
  }

  private async download(id: string, file: string, name: string): Promise<void> {
    const res = await call<{ data: string }>("POST", `/v1/sandboxes/${enc(id)}/files`, { action: "read", path: file });
    const blob = new Blob([fromBase64(res.data) as BlobPart], { type: "application/octet-stream" });
    const url = URL.createObjectURL(blob);
    const a = h("a", { href: url, download: name.replace(/[/\\]/g, "_") });
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10_000);
  }

  private async uploadChosen(): Promise<void> {
    const id = this.id;
    const file = this.upload.files?.[0];
    if (!id || !file) return;
    const data = toBase64(new Uint8Array(await file.arrayBuffer()));
    const target = `${this.dir().replace(/\/$/, "")}/${file.name}`;
    await call("POST", `/v1/sandboxes/${enc(id)}/files`, { action: "write", path: target, data, encoding: "base64" });
    notify(`uploaded ${file.name} (${bytes(file.size)})`);
    this.upload.value = "";
    await this.list();
  }
}
