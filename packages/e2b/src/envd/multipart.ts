// A streaming multipart/form-data reader: parts one after another, each part's body
// as chunks, never more than a part's headers and one boundary's length held at once
// beyond the chunk in hand. Bodies are the client's: headers are capped, a body that
// ends before its closing boundary is an error, nothing is trusted for its length.

/** Headers of one part, at most this long in all. */
const MAX_PART_HEADER_BYTES = 16 * 1024;
const MAX_PARTS = 1000;

export class MultipartError extends Error {}

export function boundaryOf(contentType: string | undefined): string {
  const m = /;\s*boundary=(?:"([^"]{1,70})"|([^\s;]{1,70}))/i.exec(contentType ?? "");
  const boundary = m?.[1] ?? m?.[2];
  if (!boundary) throw new MultipartError("a multipart body needs a boundary of 1-70 characters in its Content-Type");
  return boundary;
}

/** Pulls bytes from an async source into one growing buffer. */
class Source {
  buf: Buffer = Buffer.alloc(0);
  private done = false;

  constructor(private readonly it: AsyncIterator<Buffer>) {}

  async fill(): Promise<boolean> {
    if (this.done) return false;
    const next = await this.it.next();
    if (next.done) {
      this.done = true;
      return false;
    }
    const chunk = Buffer.isBuffer(next.value) ? next.value : Buffer.from(next.value);
    this.buf = this.buf.length === 0 ? chunk : Buffer.concat([this.buf, chunk]);
    return true;
  }

  consume(n: number): void {
    this.buf = this.buf.subarray(n);
  }
}

export type Part = { name: string | undefined; filename: string | undefined; body: AsyncGenerator<Buffer> };

function parseDisposition(headerBlock: string): { name?: string; filename?: string } {
  const line = headerBlock.split("\r\n").find((l) => /^content-disposition\s*:/i.test(l));
  if (!line) return {};
  const out: { name?: string; filename?: string } = {};
  for (const m of line.matchAll(/;\s*(name|filename)="((?:[^"\\]|\\.)*)"/gi)) {
    // Browsers and undici escape '"' and line breaks as %22, %0D and %0A in these names.
    const value = m[2]!.replace(/\\(.)/g, "$1").replace(/%22/g, '"').replace(/%0D/gi, "\r").replace(/%0A/gi, "\n");
    out[m[1]!.toLowerCase() as "name" | "filename"] = value;
  }
  return out;
}

/** The parts of a multipart body; each part's body must be read (or is skipped) before the next part comes. */
export async function* readMultipart(source: AsyncIterable<Buffer>, boundary: string): AsyncGenerator<Part> {
  const src = new Source(source[Symbol.asyncIterator]());
  const first = Buffer.from(`--${boundary}`);
  const delimiter = Buffer.from(`\r\n--${boundary}`);
  // The preamble, up to the first boundary, is ignored.
  for (;;) {
    const at = src.buf.indexOf(first);
    if (at >= 0) {
      src.consume(at + first.length);
      break;
    }
    src.consume(Math.max(0, src.buf.length - first.length));
    if (!(await src.fill())) throw new MultipartError("the multipart body has no boundary");
  }
  for (let parts = 0; ; parts++) {
    while (src.buf.length < 2) if (!(await src.fill())) throw new MultipartError("the multipart body ends without its closing boundary");
    if (src.buf[0] === 0x2d && src.buf[1] === 0x2d) return; // "--": the closing boundary; the epilogue is ignored.
    if (parts >= MAX_PARTS) throw new MultipartError(`a multipart body takes at most ${MAX_PARTS} parts`);
    // Transport padding (spaces, tabs) may follow a boundary before its line break.
    let lineEnd = src.buf.indexOf("\r\n");
    while (lineEnd < 0) {
      if (src.buf.length > 256) throw new MultipartError("a boundary line is not followed by a line break");
      if (!(await src.fill())) throw new MultipartError("the multipart body ends inside a boundary line");
      lineEnd = src.buf.indexOf("\r\n");
    }
    if (!/^[ \t]*$/.test(src.buf.subarray(0, lineEnd).toString("latin1"))) throw new MultipartError("a boundary line has text after it");
    src.consume(lineEnd + 2);
    let headerEnd = src.buf.indexOf("\r\n\r\n");
    // A part with no headers at all starts with its blank line.
    const noHeaders = src.buf.length >= 2 && src.buf[0] === 0x0d && src.buf[1] === 0x0a;
    while (!noHeaders && headerEnd < 0) {
      if (src.buf.length > MAX_PART_HEADER_BYTES) throw new MultipartError(`a part's headers are over ${MAX_PART_HEADER_BYTES} bytes`);
      if (!(await src.fill())) throw new MultipartError("the multipart body ends inside a part's headers");
      headerEnd = src.buf.indexOf("\r\n\r\n");
    }
    const headerBlock = noHeaders ? "" : src.buf.subarray(0, headerEnd).toString("utf8");
    src.consume(noHeaders ? 2 : headerEnd + 4);
    let finished = false;
    const body = (async function* (): AsyncGenerator<Buffer> {
      for (;;) {
        const at = src.buf.indexOf(delimiter);
        if (at >= 0) {
          if (at > 0) yield Buffer.from(src.buf.subarray(0, at));
          src.consume(at + delimiter.length);
          finished = true;
          return;
        }
        // Keep what could be the start of the delimiter; hand out the rest.
        const safe = src.buf.length - (delimiter.length - 1);
        if (safe > 0) {
          const out = Buffer.from(src.buf.subarray(0, safe));
          src.consume(safe);
          yield out;
        }
        if (!(await src.fill())) throw new MultipartError("the multipart body ends inside a part");
      }
    })();
    yield { ...parseDisposition(headerBlock), body } as Part;
    if (!finished) for await (const _ of body) void _; // The consumer skipped it: read past it.
  }
}
