// Reading QEMU device-state streams just enough to splice them (pure, unit-tested).
// A snapshot's vmstate.bin is: header, configuration, the RAM section (block list,
// then the small non-shared blocks such as ROMs, which every QEMU of the same
// machine has alike), then one section per device. `xen-save-devices-state` writes
// a header and the device sections only. A running child's device state therefore
// becomes a loadable stream as: the snapshot's stream up to its first device
// section, then the child's device sections.
import { ForkdError } from "../common/errors.js";

const MAGIC = 0x5145564d;
const VERSION = 3;
const SECTION_START = 0x01;
const SECTION_FULL = 0x04;
const SECTION_FOOTER = 0x7e;
/** The guest RAM's block: the id vmm/plan.ts gives the memory backend. */
export const RAM_BLOCK = "mem";

function refuse(why: string): never {
  throw new ForkdError("not_supported", `cannot splice the device state: ${why}`);
}

function checkHeader(stream: Buffer, what: string): void {
  if (stream.length < 9 || stream.readUInt32BE(0) !== MAGIC || stream.readUInt32BE(4) !== VERSION) {
    refuse(`${what} is not a QEMU migration stream (version ${VERSION})`);
  }
}

/** The id of the "ram" section, checking its block list names RAM_BLOCK with the guest's size. */
export function ramSectionId(vmstate: Buffer, memoryBytes: number): number {
  checkHeader(vmstate, "the snapshot's device state");
  const name = Buffer.from([3, ...Buffer.from("ram")]);
  for (let at = vmstate.indexOf(name, 8); at >= 0; at = vmstate.indexOf(name, at + 1)) {
    if (at < 5 || vmstate[at - 5] !== SECTION_START) continue;
    const id = vmstate.readUInt32BE(at - 4);
    // Then instance and version ids, the total RAM size with flags, and the block list.
    const blocks = at + name.length + 8 + 8;
    const block = Buffer.from([RAM_BLOCK.length, ...Buffer.from(RAM_BLOCK)]);
    const found = vmstate.indexOf(block, blocks);
    if (found < 0 || found > blocks + 4096) refuse(`its RAM section has no block ${RAM_BLOCK}`);
    const size = Number(vmstate.readBigUInt64BE(found + block.length));
    if (size !== memoryBytes) refuse(`its RAM block ${RAM_BLOCK} is ${size} bytes, not the guest's ${memoryBytes}`);
    return id;
  }
  return refuse("the snapshot's stream has no RAM section");
}

/**
 * Where the snapshot's stream starts its device sections, found by the exact
 * header of the first section in `devices` (type, id, name, instance, version),
 * right after the footer of the section before it.
 */
export function deviceSplice(vmstate: Buffer, devices: Buffer): number {
  checkHeader(vmstate, "the snapshot's device state");
  checkHeader(devices, "the captured device state");
  if (devices[8] !== SECTION_FULL || devices.length < 14) refuse("the captured device state does not start with a device section");
  const nameLength = devices[13]!;
  const header = devices.subarray(8, 8 + 1 + 4 + 1 + nameLength + 8);
  const at = vmstate.indexOf(header, 8);
  if (at < 5 || vmstate[at - 5] !== SECTION_FOOTER) {
    refuse(`the snapshot's stream has no device section '${devices.subarray(14, 14 + nameLength).toString("latin1")}' where devices start`);
  }
  return at;
}

/** The snapshot's stream with the captured device sections in place of its own (and no guest pages). */
export function spliceDevices(vmstate: Buffer, devices: Buffer): Buffer {
  return Buffer.concat([vmstate.subarray(0, deviceSplice(vmstate, devices)), devices.subarray(8)]);
}
