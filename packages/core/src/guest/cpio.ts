// A minimal writer for the cpio "newc" format the Linux kernel unpacks as an
// initramfs. Owning it (instead of piping a file list to cpio(1)) keeps the
// image build free of shell plumbing and makes entries fully deterministic.

export type CpioEntry =
  | { path: string; type: "file"; mode: number; data: Buffer }
  | { path: string; type: "dir"; mode: number }
  | { path: string; type: "symlink"; target: string };

const TYPE_BITS = { file: 0o100000, dir: 0o040000, symlink: 0o120000 } as const;

function hex8(value: number): string {
  return value.toString(16).padStart(8, "0");
}

function pad4(length: number): Buffer {
  const rem = length % 4;
  return Buffer.alloc(rem === 0 ? 0 : 4 - rem);
}

function record(ino: number, mode: number, nlink: number, name: string, body: Buffer): Buffer[] {
  const nameBytes = Buffer.from(`${name}\0`, "utf8");
  const header = Buffer.from(
    [
      "070701",
      hex8(ino),
      hex8(mode),
      hex8(0), // uid
      hex8(0), // gid
      hex8(nlink),
      hex8(0), // mtime: fixed so the same inputs give the same bytes
      hex8(body.length),
      hex8(0),
      hex8(0),
      hex8(0),
      hex8(0),
      hex8(nameBytes.length),
      hex8(0),
    ].join(""),
    "ascii",
  );
  return [header, nameBytes, pad4(header.length + nameBytes.length), body, pad4(body.length)];
}

export function writeCpio(entries: CpioEntry[]): Buffer {
  const parts: Buffer[] = [];
  let ino = 1;
  for (const entry of entries) {
    const name = entry.path.replace(/^\/+/, "");
    if (name === "" || name.split("/").includes("..")) throw new Error(`bad cpio path '${entry.path}'`);
    if (entry.type === "file") {
      parts.push(...record(ino++, TYPE_BITS.file | (entry.mode & 0o7777), 1, name, entry.data));
    } else if (entry.type === "dir") {
      parts.push(...record(ino++, TYPE_BITS.dir | (entry.mode & 0o7777), 2, name, Buffer.alloc(0)));
    } else {
      parts.push(...record(ino++, TYPE_BITS.symlink | 0o777, 1, name, Buffer.from(entry.target, "utf8")));
    }
  }
  parts.push(...record(0, 0, 1, "TRAILER!!!", Buffer.alloc(0)));
  return Buffer.concat(parts);
}
