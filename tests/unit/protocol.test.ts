import { encodeFrame, FrameDecoder, MAX_FRAME_BYTES } from "@forkd/agent/protocol";
import { describe, expect, it } from "vitest";

describe("frame codec", () => {
  it("round-trips frames split at every byte boundary", () => {
    const bytes = Buffer.concat([encodeFrame({ id: 1, op: "ping" }), encodeFrame({ id: 2, text: "héllo" })]);
    for (let cut = 0; cut <= bytes.length; cut++) {
      const decoder = new FrameDecoder();
      const frames = [...decoder.push(bytes.subarray(0, cut)), ...decoder.push(bytes.subarray(cut))];
      expect(frames).toEqual([
        { ok: true, message: { id: 1, op: "ping" } },
        { ok: true, message: { id: 2, text: "héllo" } },
      ]);
      expect(decoder.pendingBytes).toBe(0);
    }
  });

  it("reports bad JSON and keeps decoding the next frame", () => {
    const body = Buffer.from("{not json", "utf8");
    const header = Buffer.alloc(4);
    header.writeUInt32BE(body.length);
    const frames = new FrameDecoder().push(Buffer.concat([header, body, encodeFrame({ id: 3 })]));
    expect(frames[0]?.ok).toBe(false);
    expect(frames[1]).toEqual({ ok: true, message: { id: 3 } });
  });

  it("rejects an oversized header and skips its body to stay aligned", () => {
    const decoder = new FrameDecoder(16);
    const header = Buffer.alloc(4);
    header.writeUInt32BE(40);
    const first = decoder.push(Buffer.concat([header, Buffer.alloc(10)]));
    expect(first).toHaveLength(1);
    expect(first[0]?.ok).toBe(false);
    expect(decoder.push(Buffer.alloc(30))).toEqual([]);
    expect(decoder.push(encodeFrame({ id: 4 }))).toEqual([{ ok: true, message: { id: 4 } }]);
  });

  it("refuses to encode a frame over the limit", () => {
    expect(() => encodeFrame({ data: "x".repeat(MAX_FRAME_BYTES) })).toThrow(/exceeds/);
  });
});
