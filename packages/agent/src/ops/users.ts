// The guest's users and groups, read from /etc/passwd and /etc/group (the guest has
// no NSS daemon to ask). Used to run a process as a named user, to create files owned
// by one, and to name a file's owner and group the way `ls -l` does.
import fs from "node:fs";
import { AgentOpError } from "./errors.js";

export type GuestUser = { name: string; uid: number; gid: number; home: string; shell: string };

/** Larger account files than this are not read: a guest with that many users is not one we built. */
const MAX_ACCOUNT_FILE_BYTES = 1024 * 1024;
const USER_NAME_RE = /^[a-z_][a-z0-9_.-]{0,31}\$?$/i;

type Accounts = { users: GuestUser[]; groups: Map<number, string>; readAt: number };
let cached: Accounts | undefined;
/** Account files change rarely (useradd in a template); a second's staleness is harmless. */
const CACHE_MS = 1000;

function readSmall(path: string): string {
  try {
    const st = fs.statSync(path);
    if (st.size > MAX_ACCOUNT_FILE_BYTES) return "";
    return fs.readFileSync(path, "utf8");
  } catch {
    return "";
  }
}

function accounts(): Accounts {
  const now = Date.now();
  if (cached && now - cached.readAt < CACHE_MS) return cached;
  const users: GuestUser[] = [];
  for (const line of readSmall("/etc/passwd").split("\n")) {
    const f = line.split(":");
    if (f.length < 7) continue;
    const uid = Number(f[2]);
    const gid = Number(f[3]);
    if (!Number.isSafeInteger(uid) || !Number.isSafeInteger(gid) || uid < 0 || gid < 0) continue;
    users.push({ name: f[0]!, uid, gid, home: f[5] || "/", shell: f[6] || "/bin/sh" });
  }
  const groups = new Map<number, string>();
  for (const line of readSmall("/etc/group").split("\n")) {
    const f = line.split(":");
    if (f.length < 3) continue;
    const gid = Number(f[2]);
    if (Number.isSafeInteger(gid) && gid >= 0 && !groups.has(gid)) groups.set(gid, f[0]!);
  }
  cached = { users, groups, readAt: now };
  return cached;
}

/** The user named `name`; `root` exists even in a guest without /etc/passwd. */
export function lookupUser(name: unknown): GuestUser {
  if (typeof name !== "string" || !USER_NAME_RE.test(name)) {
    throw new AgentOpError("bad_request", "`user` must be a user name such as user or root");
  }
  const found = accounts().users.find((u) => u.name === name);
  if (found) return found;
  if (name === "root") return { name: "root", uid: 0, gid: 0, home: "/root", shell: "/bin/sh" };
  throw new AgentOpError("not_found", `no user named '${name}' in this sandbox`);
}

/** The owner's name for a uid, or the number itself as text (as E2B's envd does). */
export function userName(uid: number): string {
  return accounts().users.find((u) => u.uid === uid)?.name ?? String(uid);
}

export function groupName(gid: number): string {
  return accounts().groups.get(gid) ?? String(gid);
}
