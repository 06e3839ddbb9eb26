/*
 * forkd-guestctl: the two guest operations Node cannot do without ioctl/clock_settime.
 *   forkd-guestctl reseed   < entropy   mix stdin into the pool, credit it, reseed the CRNG
 *   forkd-guestctl settime MS            set CLOCK_REALTIME to MS milliseconds since the epoch
 *   forkd-guestctl fasync FD PID         deliver SIGIO for the inherited fd FD to process PID: the
 *                                        agent sleeps until virtio-serial signals that a host connected,
 *                                        instead of polling a port whose read() returns 0 while no host is there
 *   forkd-guestctl serve                 answer "R <hex entropy>", "T <ms>" and "I <hostname> <hex> <ms>" lines on stdin with
 *                                        "ok" or "err <reason>" lines: the agent starts it once at boot,
 *                                        so a restored child pays a pipe round trip, not a process spawn
 *   forkd-guestctl gate VERSION RUNTIMES STARTED_MS
 *                                        the agent port's gatekeeper (port on fd 3, the agent on stdin and stdout):
 *                                        see "The gate" below
 *   forkd-guestctl pty ROWS COLS PROG [ARG...]
 *                                        run PROG on a new pseudo-terminal of ROWS x COLS, relaying
 *                                        stdin to it and its output to stdout: the dashboard's terminal
 *                                        (Node has no openpty without a native addon)
 * Children restored from one snapshot start with identical CRNG state; writing to
 * /dev/urandom only mixes the input pool, so without RNDRESEEDCRNG they would keep
 * producing the same bytes until the kernel's next timed reseed.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/random.h>
#include <math.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

struct entropy_req {
  struct rand_pool_info info;
  unsigned char buf[512];
};

static const char *reseed_bytes(struct entropy_req *req, size_t n) {
  int fd = open("/dev/random", O_WRONLY | O_CLOEXEC);
  if (fd < 0) return "open /dev/random failed";
  req->info.entropy_count = (int)n * 8;
  req->info.buf_size = (int)n;
  const char *err = NULL;
  if (ioctl(fd, RNDADDENTROPY, &req->info) < 0) err = "RNDADDENTROPY failed";
  else if (ioctl(fd, RNDRESEEDCRNG) < 0) err = "RNDRESEEDCRNG failed";
  close(fd);
  return err;
}

static int reseed(void) {
  struct entropy_req req;
  ssize_t n = read(0, req.buf, sizeof req.buf);
  if (n < 16) {
    fprintf(stderr, "forkd-guestctl: need at least 16 bytes of entropy on stdin\n");
    return 2;
  }
  const char *err = reseed_bytes(&req, (size_t)n);
  if (err) { fprintf(stderr, "forkd-guestctl: %s: %s\n", err, strerror(errno)); return 1; }
  return 0;
}

static int hexval(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  return -1;
}

/* Parse hex entropy up to a space or the end; NULL and a message when there is too little. */
static const char *parse_entropy(const char *p, struct entropy_req *req, size_t *n, const char **rest) {
  *n = 0;
  while (p[0] && p[1] && p[0] != ' ' && *n < sizeof req->buf) {
    int hi = hexval(p[0]), lo = hexval(p[1]);
    if (hi < 0 || lo < 0) return "entropy must be hex";
    req->buf[(*n)++] = (unsigned char)(hi << 4 | lo);
    p += 2;
  }
  if (*n < 16) {
    errno = 0;
    return "need at least 16 bytes of hex entropy";
  }
  *rest = p;
  return NULL;
}

static const char *parse_ms(const char *text, long long *ms) {
  char *end = NULL;
  errno = 0;
  *ms = strtoll(text, &end, 10);
  if (errno != 0 || end == text || *end != '\0' || *ms < 0) {
    errno = 0;
    return "bad milliseconds";
  }
  return NULL;
}

static const char *set_clock_ms(long long ms) {
  struct timespec ts = {.tv_sec = ms / 1000, .tv_nsec = (ms % 1000) * 1000000L};
  if (clock_settime(CLOCK_REALTIME, &ts) < 0) return "clock_settime failed";
  return NULL;
}

static int serve(void) {
  char line[2048];
  setvbuf(stdout, NULL, _IOLBF, 0);
  while (fgets(line, sizeof line, stdin)) {
    line[strcspn(line, "\n")] = '\0';
    struct entropy_req req;
    size_t n = 0;
    long long ms = 0;
    const char *rest = NULL;
    const char *err = NULL;
    errno = 0;
    if (line[0] == 'R' && line[1] == ' ') {
      err = parse_entropy(line + 2, &req, &n, &rest);
      if (!err) err = reseed_bytes(&req, n);
    } else if (line[0] == 'T' && line[1] == ' ') {
      err = parse_ms(line + 2, &ms);
      if (!err) err = set_clock_ms(ms);
    } else if (line[0] == 'I' && line[1] == ' ') {
      /* A restored child's whole identity in one round trip: hostname, entropy, clock.
       * Everything is parsed before anything is changed. */
      char *host = line + 2;
      char *space = strchr(host, ' ');
      if (!space) err = "identity wants: I <hostname> <hex entropy> <ms>";
      else {
        *space = '\0';
        err = parse_entropy(space + 1, &req, &n, &rest);
        if (!err && *rest != ' ') err = "identity wants: I <hostname> <hex entropy> <ms>";
        if (!err) err = parse_ms(rest + 1, &ms);
        if (!err && sethostname(host, strlen(host)) < 0) err = "sethostname failed";
        if (!err) err = reseed_bytes(&req, n);
        if (!err) err = set_clock_ms(ms);
      }
    } else {
      err = "unknown request";
    }
    if (err && errno) printf("err %s: %s\n", err, strerror(errno));
    else if (err) printf("err %s\n", err);
    else printf("ok\n");
  }
  return 0;
}

/*
 * The gate. A warm snapshot is taken with the agent "parked": the Node agent has
 * stopped reading the port and this process reads it instead (the agent's `park`
 * op). A restored child's first calls are its identity and readiness probes, and
 * then what agents do most: run a command, read, write or stat a file. The gate
 * answers those itself (hostname, CRNG reseed, clock; ping; cancel; exec with pipes
 * and exit status; files read, write and stat), so a child that only runs commands
 * never wakes the JavaScript runtime, whose code TCG would translate afresh in every
 * child and whose heap pages every child would copy.
 * One protocol, one set of semantics: the gate answers only requests it reads
 * exactly as the agent would and whose outcome it can give in the agent's own words
 * (same frames, limits, result fields and error codes and messages). Anything else
 * (eval, background processes, a malformed or unusual request, a large frame, an
 * error whose message only Node would word) goes to the agent untouched: the gate
 * writes what it read from the port to stdout ('F', a 4-byte big-endian length, the
 * bytes), hands the port's SIGIO back to the agent and waits for the next park
 * ("P <id>" on stdin, answered on the port as the park call's result).
 * Commands the gate started keep running after a hand-off: their frames then go to
 * the agent ('W' + an encoded frame), which sends them in its own order with its
 * own; the agent learns which calls are the gate's ('N' + id, before the 'F') and
 * forwards a cancel ("C <id>") or the host's leaving ("A").
 * Messages to the agent: 'S' (SIGIO routed to the agent) or 's' + reason, 'N', 'F', 'W'.
 */
#define GATE_MAX_FRAME (256 * 1024)
/* The protocol's limits (packages/agent/src/protocol.ts) and the agent's exec constants (ops/exec.ts). */
#define MAX_EXEC_TIMEOUT_MS 3600000.0
#define MAX_FILE_BYTES (8 * 1024 * 1024)
#define EXIT_QUIET_MS 100
#define EXIT_GRACE_MS 2000
/* What the gate takes on itself; more goes to the agent, which has the same limits as always. */
#define NATIVE_MAX_CALLS 8
#define NATIVE_MAX_READ_BYTES (128 * 1024)
#define NATIVE_MAX_STDIN_BYTES (16 * 1024)
#define NATIVE_MAX_ARGS 256
#define NATIVE_MAX_ENV 128
#define NATIVE_MAX_LINGERING 64
#define OUTPUT_READ_BYTES 65536
#define PATH_BYTES 4096

static const char *gate_version = "";
static const char *gate_runtimes = "";
static long long gate_started_ms = 0;
static int gate_port = 3;
static int gate_parked = 0;

static int write_all(int fd, const void *buf, size_t len) {
  const char *p = buf;
  while (len > 0) {
    ssize_t n = write(fd, p, len);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return -1;
    p += n;
    len -= (size_t)n;
  }
  return 0;
}

static long long now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Monotonic milliseconds, with fractions: exec's durationMs and the settle clocks. */
static double mono_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec * 1000.0 + (double)ts.tv_nsec / 1e6;
}

static void to_agent(char type, const unsigned char *bytes, size_t n) {
  unsigned char header[5] = {(unsigned char)type, (unsigned char)(n >> 24), (unsigned char)(n >> 16), (unsigned char)(n >> 8),
                             (unsigned char)n};
  if (write_all(1, header, 5) < 0 || (n > 0 && write_all(1, bytes, n) < 0)) exit(0);
}

/* --- JSON: the request shapes the gate reads, strictly (anything doubtful leaves the frame to the agent) --- */

typedef struct { const char *p, *end; } cursor;

static void skip_ws(cursor *c) {
  while (c->p < c->end && (*c->p == ' ' || *c->p == '\t' || *c->p == '\n' || *c->p == '\r')) c->p++;
}

static int hex4(const char *p, unsigned int *out) {
  unsigned int v = 0;
  for (int i = 0; i < 4; i++) {
    char ch = p[i];
    int h = (ch >= 'A' && ch <= 'F') ? ch - 'A' + 10 : hexval(ch);
    if (h < 0) return -1;
    v = v << 4 | (unsigned int)h;
  }
  *out = v;
  return 0;
}

/* Valid UTF-8 (what Node's decoder keeps as is); the agent would see U+FFFD where this is false. */
static int utf8_valid(const unsigned char *s, size_t n) {
  size_t i = 0;
  while (i < n) {
    unsigned char ch = s[i];
    size_t len = ch < 0x80 ? 1 : (ch >> 5) == 0x6 ? 2 : (ch >> 4) == 0xe ? 3 : (ch >> 3) == 0x1e ? 4 : 0;
    if (len == 0 || i + len > n) return 0;
    unsigned int cp = len == 1 ? ch : len == 2 ? ch & 0x1fu : len == 3 ? ch & 0x0fu : ch & 0x07u;
    for (size_t k = 1; k < len; k++) {
      if ((s[i + k] & 0xc0) != 0x80) return 0;
      cp = cp << 6 | (s[i + k] & 0x3fu);
    }
    if ((len == 2 && cp < 0x80) || (len == 3 && cp < 0x800) || (len == 4 && (cp < 0x10000 || cp > 0x10ffff)) ||
        (cp >= 0xd800 && cp <= 0xdfff))
      return 0;
    i += len;
  }
  return 1;
}

/* Scratch space for a request's unescaped strings: never more than the frame itself. */
static char arena[GATE_MAX_FRAME + 16];
static size_t arena_used = 0;

/*
 * A JSON string, unescaped into the arena (NUL-terminated; *n is its length). -1 for
 * anything the agent might read differently: a NUL inside, a lone surrogate, bytes
 * that are not UTF-8.
 */
static int json_string(cursor *c, char **s, size_t *n) {
  if (c->p >= c->end || *c->p != '"') return -1;
  c->p++;
  char *out = arena + arena_used;
  size_t o = 0;
  size_t room = sizeof arena - arena_used;
  while (c->p < c->end && *c->p != '"') {
    unsigned char ch = (unsigned char)*c->p;
    if (ch < 0x20) return -1;
    if (o + 5 >= room) return -1;
    if (ch != '\\') {
      out[o++] = (char)ch;
      c->p++;
      continue;
    }
    if (c->end - c->p < 2) return -1;
    char e = c->p[1];
    c->p += 2;
    switch (e) {
      case '"': out[o++] = '"'; break;
      case '\\': out[o++] = '\\'; break;
      case '/': out[o++] = '/'; break;
      case 'b': out[o++] = '\b'; break;
      case 'f': out[o++] = '\f'; break;
      case 'n': out[o++] = '\n'; break;
      case 'r': out[o++] = '\r'; break;
      case 't': out[o++] = '\t'; break;
      case 'u': {
        unsigned int cp;
        if (c->end - c->p < 4 || hex4(c->p, &cp) < 0) return -1;
        c->p += 4;
        if (cp >= 0xd800 && cp <= 0xdbff) {
          unsigned int lo;
          if (c->end - c->p < 6 || c->p[0] != '\\' || c->p[1] != 'u' || hex4(c->p + 2, &lo) < 0 || lo < 0xdc00 || lo > 0xdfff) return -1;
          c->p += 6;
          cp = 0x10000 + ((cp - 0xd800) << 10) + (lo - 0xdc00);
        } else if (cp >= 0xdc00 && cp <= 0xdfff) {
          return -1;
        }
        if (cp == 0) return -1;
        if (cp < 0x80) {
          out[o++] = (char)cp;
        } else if (cp < 0x800) {
          out[o++] = (char)(0xc0 | cp >> 6);
          out[o++] = (char)(0x80 | (cp & 0x3f));
        } else if (cp < 0x10000) {
          out[o++] = (char)(0xe0 | cp >> 12);
          out[o++] = (char)(0x80 | ((cp >> 6) & 0x3f));
          out[o++] = (char)(0x80 | (cp & 0x3f));
        } else {
          out[o++] = (char)(0xf0 | cp >> 18);
          out[o++] = (char)(0x80 | ((cp >> 12) & 0x3f));
          out[o++] = (char)(0x80 | ((cp >> 6) & 0x3f));
          out[o++] = (char)(0x80 | (cp & 0x3f));
        }
        break;
      }
      default:
        return -1;
    }
  }
  if (c->p >= c->end) return -1;
  c->p++;
  if (!utf8_valid((const unsigned char *)out, o)) return -1;
  out[o] = '\0';
  arena_used += o + 1;
  *s = out;
  *n = o;
  return 0;
}

/* A JSON number, as JSON.parse reads it (a leading '+', a bare '.', hex and the like are refused). */
static int number_value(cursor *c, double *out) {
  char buf[64];
  const char *start = c->p;
  const char *q = c->p;
  if (q < c->end && *q == '-') q++;
  if (q >= c->end || *q < '0' || *q > '9') return -1;
  if (*q == '0' && q + 1 < c->end && q[1] >= '0' && q[1] <= '9') return -1;
  while (q < c->end && strchr("+-0123456789.eE", *q) != NULL) q++;
  size_t n = (size_t)(q - start);
  if (n >= sizeof buf) return -1;
  memcpy(buf, start, n);
  buf[n] = '\0';
  char *end = NULL;
  errno = 0;
  double v = strtod(buf, &end);
  if (errno != 0 || *end != '\0' || !isfinite(v)) return -1;
  c->p = q;
  *out = v;
  return 0;
}

static int literal(cursor *c, const char *word) {
  size_t n = strlen(word);
  if ((size_t)(c->end - c->p) < n || memcmp(c->p, word, n) != 0) return -1;
  c->p += n;
  return 0;
}

/* Skip any JSON value, checking it as JSON.parse would (depth-limited). */
static int skip_value(cursor *c, int depth) {
  if (depth > 64) return -1;
  skip_ws(c);
  if (c->p >= c->end) return -1;
  char ch = *c->p;
  if (ch == '"') {
    char *s;
    size_t n;
    size_t mark = arena_used;
    int r = json_string(c, &s, &n);
    arena_used = mark;
    return r;
  }
  if (ch == '{' || ch == '[') {
    char close = ch == '{' ? '}' : ']';
    c->p++;
    skip_ws(c);
    if (c->p < c->end && *c->p == close) {
      c->p++;
      return 0;
    }
    for (;;) {
      if (ch == '{') {
        skip_ws(c);
        char *s;
        size_t n;
        size_t mark = arena_used;
        int r = json_string(c, &s, &n);
        arena_used = mark;
        if (r < 0) return -1;
        skip_ws(c);
        if (c->p >= c->end || *c->p != ':') return -1;
        c->p++;
      }
      if (skip_value(c, depth + 1) < 0) return -1;
      skip_ws(c);
      if (c->p < c->end && *c->p == ',') {
        c->p++;
        continue;
      }
      if (c->p < c->end && *c->p == close) {
        c->p++;
        return 0;
      }
      return -1;
    }
  }
  if (ch == 't') return literal(c, "true");
  if (ch == 'f') return literal(c, "false");
  if (ch == 'n') return literal(c, "null");
  double ignored;
  return number_value(c, &ignored);
}

typedef struct {
  const char *key;
  size_t n;
} kv;

typedef struct {
  int has_id, has_hostname, has_entropy, has_clock, has_target;
  double id, target;
  char *op, *hostname, *entropy;
  size_t op_n, hostname_n, entropy_n;
  double clock_ms;
  /* exec */
  int has_argv, has_cmd, has_cwd, has_stdin, has_timeout, has_env;
  char *argv[NATIVE_MAX_ARGS + 1];
  size_t argc;
  char *cmd, *cwd, *stdin_b64;
  size_t cmd_n, cwd_n, stdin_n;
  double timeout_ms;
  char *env_keys[NATIVE_MAX_ENV], *env_values[NATIVE_MAX_ENV];
  size_t env_n;
  /* files */
  int has_action, has_path, has_data, has_mode, has_append;
  char *action, *path, *data;
  size_t action_n, path_n, data_n;
  double mode;
  int append;
  /* A field the gate does not take as the agent would (a wrong type, for one): the agent answers. */
  int unsure;
  /* A field the gate does not know: an exec or files call with one is the agent's (a field added to the protocol later is not ignored here). */
  int unknown_field;
} request;

static int string_array(cursor *c, request *r) {
  if (c->p >= c->end || *c->p != '[') return -1;
  c->p++;
  r->argc = 0;
  skip_ws(c);
  if (c->p < c->end && *c->p == ']') {
    c->p++;
    return 0;
  }
  for (;;) {
    skip_ws(c);
    size_t n;
    if (r->argc >= NATIVE_MAX_ARGS || json_string(c, &r->argv[r->argc], &n) < 0) return -1;
    r->argc++;
    skip_ws(c);
    if (c->p < c->end && *c->p == ',') {
      c->p++;
      continue;
    }
    if (c->p < c->end && *c->p == ']') {
      c->p++;
      r->argv[r->argc] = NULL;
      return 0;
    }
    return -1;
  }
}

static int string_object(cursor *c, request *r) {
  if (c->p >= c->end || *c->p != '{') return -1;
  c->p++;
  r->env_n = 0;
  skip_ws(c);
  if (c->p < c->end && *c->p == '}') {
    c->p++;
    return 0;
  }
  for (;;) {
    skip_ws(c);
    size_t kn, vn;
    if (r->env_n >= NATIVE_MAX_ENV || json_string(c, &r->env_keys[r->env_n], &kn) < 0) return -1;
    skip_ws(c);
    if (c->p >= c->end || *c->p != ':') return -1;
    c->p++;
    skip_ws(c);
    if (json_string(c, &r->env_values[r->env_n], &vn) < 0) return -1;
    /* A repeated name: JSON.parse keeps the last value in the first one's place. */
    size_t k;
    for (k = 0; k < r->env_n; k++)
      if (strcmp(r->env_keys[k], r->env_keys[r->env_n]) == 0) break;
    if (k < r->env_n) r->env_values[k] = r->env_values[r->env_n];
    else r->env_n++;
    skip_ws(c);
    if (c->p < c->end && *c->p == ',') {
      c->p++;
      continue;
    }
    if (c->p < c->end && *c->p == '}') {
      c->p++;
      return 0;
    }
    return -1;
  }
}

/* A string field: a JSON string is taken; another JSON value marks the request unsure; -1 is not JSON. */
static int string_field(cursor *c, request *r, char **s, size_t *n, int *has) {
  if (c->p < c->end && *c->p == '"') {
    if (json_string(c, s, n) < 0) return -1;
    *has = 1;
    return 0;
  }
  r->unsure = 1;
  return skip_value(c, 0);
}

static int number_field(cursor *c, request *r, double *v, int *has) {
  if (c->p < c->end && (*c->p == '-' || (*c->p >= '0' && *c->p <= '9'))) {
    if (number_value(c, v) < 0) return -1;
    *has = 1;
    return 0;
  }
  r->unsure = 1;
  return skip_value(c, 0);
}

/* 0: parsed (fields it has are set); -1: not for the gate. Later duplicates win, as in JSON.parse. */
static int parse_request(const unsigned char *body, size_t len, request *r) {
  memset(r, 0, sizeof *r);
  arena_used = 0;
  cursor c = {(const char *)body, (const char *)body + len};
  skip_ws(&c);
  if (c.p >= c.end || *c.p != '{') return -1;
  c.p++;
  skip_ws(&c);
  if (c.p < c.end && *c.p == '}') return -1;
  for (;;) {
    char *key;
    size_t key_n;
    skip_ws(&c);
    if (json_string(&c, &key, &key_n) < 0) return -1;
    skip_ws(&c);
    if (c.p >= c.end || *c.p != ':') return -1;
    c.p++;
    skip_ws(&c);
    int has = 0;
#define KEY(name) (key_n == sizeof(name) - 1 && memcmp(key, name, key_n) == 0)
    if (KEY("op")) {
      if (string_field(&c, r, &r->op, &r->op_n, &has) < 0) return -1;
      if (!has) return -1;
    } else if (KEY("hostname")) {
      if (string_field(&c, r, &r->hostname, &r->hostname_n, &r->has_hostname) < 0) return -1;
    } else if (KEY("entropy")) {
      if (string_field(&c, r, &r->entropy, &r->entropy_n, &r->has_entropy) < 0) return -1;
    } else if (KEY("id")) {
      if (number_field(&c, r, &r->id, &r->has_id) < 0) return -1;
    } else if (KEY("clockMs")) {
      if (number_field(&c, r, &r->clock_ms, &r->has_clock) < 0) return -1;
    } else if (KEY("target")) {
      if (number_field(&c, r, &r->target, &r->has_target) < 0) return -1;
    } else if (KEY("argv")) {
      if (c.p < c.end && *c.p == '[') {
        if (string_array(&c, r) < 0) return -1;
        r->has_argv = 1;
      } else {
        r->unsure = 1;
        if (skip_value(&c, 0) < 0) return -1;
      }
    } else if (KEY("env")) {
      if (c.p < c.end && *c.p == '{') {
        if (string_object(&c, r) < 0) return -1;
        r->has_env = 1;
      } else {
        r->unsure = 1;
        if (skip_value(&c, 0) < 0) return -1;
      }
    } else if (KEY("cmd")) {
      if (string_field(&c, r, &r->cmd, &r->cmd_n, &r->has_cmd) < 0) return -1;
    } else if (KEY("cwd")) {
      if (string_field(&c, r, &r->cwd, &r->cwd_n, &r->has_cwd) < 0) return -1;
    } else if (KEY("stdin")) {
      if (string_field(&c, r, &r->stdin_b64, &r->stdin_n, &r->has_stdin) < 0) return -1;
    } else if (KEY("timeoutMs")) {
      if (number_field(&c, r, &r->timeout_ms, &r->has_timeout) < 0) return -1;
    } else if (KEY("action")) {
      if (string_field(&c, r, &r->action, &r->action_n, &r->has_action) < 0) return -1;
    } else if (KEY("path")) {
      if (string_field(&c, r, &r->path, &r->path_n, &r->has_path) < 0) return -1;
    } else if (KEY("data")) {
      if (string_field(&c, r, &r->data, &r->data_n, &r->has_data) < 0) return -1;
    } else if (KEY("mode")) {
      if (number_field(&c, r, &r->mode, &r->has_mode) < 0) return -1;
    } else if (KEY("append")) {
      if (literal(&c, "true") == 0) r->append = 1, r->has_append = 1;
      else if (literal(&c, "false") == 0) r->append = 0, r->has_append = 1;
      else {
        r->unsure = 1;
        if (skip_value(&c, 0) < 0) return -1;
      }
    } else if (KEY("via")) {
      /* The host asks for the JavaScript runtime (FORKD_AGENT_NATIVE_CALLS=off): the agent answers. */
      r->unsure = 1;
      if (skip_value(&c, 0) < 0) return -1;
    } else {
      r->unknown_field = 1;
      if (skip_value(&c, 0) < 0) return -1;
    }
#undef KEY
    skip_ws(&c);
    if (c.p < c.end && *c.p == ',') {
      c.p++;
      continue;
    }
    if (c.p < c.end && *c.p == '}') {
      c.p++;
      skip_ws(&c);
      return c.p == c.end ? 0 : -1;
    }
    return -1;
  }
}

static int b64val(char ch) {
  if (ch >= 'A' && ch <= 'Z') return ch - 'A';
  if (ch >= 'a' && ch <= 'z') return ch - 'a' + 26;
  if (ch >= '0' && ch <= '9') return ch - '0' + 52;
  if (ch == '+') return 62;
  if (ch == '/') return 63;
  return -1;
}

/* Strict base64 (padded); -1 for anything else, which the agent then decodes its own way. */
static int base64_decode(const char *s, size_t n, unsigned char *out, size_t cap, size_t *out_n) {
  if (n % 4 != 0) return -1;
  size_t o = 0;
  for (size_t i = 0; i < n; i += 4) {
    int v[4];
    int pad = 0;
    for (int k = 0; k < 4; k++) {
      if (s[i + k] == '=' && i + 4 == n && k >= 2) {
        v[k] = 0;
        pad++;
      } else {
        if (pad) return -1;
        v[k] = b64val(s[i + k]);
        if (v[k] < 0) return -1;
      }
    }
    unsigned int triple = (unsigned int)(v[0] << 18 | v[1] << 12 | v[2] << 6 | v[3]);
    unsigned char bytes[3] = {(unsigned char)(triple >> 16), (unsigned char)(triple >> 8), (unsigned char)triple};
    for (int k = 0; k < 3 - pad; k++) {
      if (o >= cap) return -1;
      out[o++] = bytes[k];
    }
  }
  *out_n = o;
  return 0;
}

static const char B64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/* Padded base64 of n bytes into out (room for 4 * ceil(n / 3) + 1); returns its length. */
static size_t base64_encode(const unsigned char *in, size_t n, char *out) {
  size_t o = 0;
  for (size_t i = 0; i < n; i += 3) {
    unsigned int b = (unsigned int)in[i] << 16 | (i + 1 < n ? (unsigned int)in[i + 1] << 8 : 0) | (i + 2 < n ? in[i + 2] : 0);
    out[o++] = B64[b >> 18 & 63];
    out[o++] = B64[b >> 12 & 63];
    out[o++] = i + 1 < n ? B64[b >> 6 & 63] : '=';
    out[o++] = i + 2 < n ? B64[b & 63] : '=';
  }
  out[o] = '\0';
  return o;
}

/* The agent's hostname rule: 1-63 letters, digits or '-', not starting or ending with '-'. */
static int valid_hostname(const char *s, size_t n) {
  if (n < 1 || n > 63 || s[0] == '-' || s[n - 1] == '-') return 0;
  for (size_t i = 0; i < n; i++) {
    char ch = s[i];
    if (!((ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') || ch == '-')) return 0;
  }
  return 1;
}

/* JSON.stringify of a string (its content; the caller adds the quotes), cut to fit cap. */
static size_t json_escape(const char *in, char *out, size_t cap) {
  size_t o = 0;
  for (const unsigned char *p = (const unsigned char *)in; *p && o + 7 < cap; p++) {
    if (*p == '"' || *p == '\\') {
      out[o++] = '\\';
      out[o++] = (char)*p;
    } else if (*p == '\n') {
      out[o++] = '\\';
      out[o++] = 'n';
    } else if (*p == '\t') {
      out[o++] = '\\';
      out[o++] = 't';
    } else if (*p == '\r') {
      out[o++] = '\\';
      out[o++] = 'r';
    } else if (*p == '\b') {
      out[o++] = '\\';
      out[o++] = 'b';
    } else if (*p == '\f') {
      out[o++] = '\\';
      out[o++] = 'f';
    } else if (*p < 0x20) {
      o += (size_t)snprintf(out + o, cap - o, "\\u%04x", *p);
    } else {
      out[o++] = (char)*p;
    }
  }
  out[o] = '\0';
  return o;
}

/* --- answers: on the port while parked, through the agent once it has the port --- */

static unsigned char out_frame[4 + 2 * GATE_MAX_FRAME];

/* One answer frame (json is out_frame + 4, n bytes); a host that has gone away simply never reads it. */
static void send_built(size_t n) {
  out_frame[0] = (unsigned char)(n >> 24);
  out_frame[1] = (unsigned char)(n >> 16);
  out_frame[2] = (unsigned char)(n >> 8);
  out_frame[3] = (unsigned char)n;
  if (gate_parked) (void)write_all(gate_port, out_frame, n + 4);
  else to_agent('W', out_frame, n + 4);
}

#define OUT_JSON ((char *)out_frame + 4)
#define OUT_CAP (sizeof out_frame - 4)

static void send_frame(const char *json) {
  size_t n = strlen(json);
  if (n > OUT_CAP) return;
  memmove(OUT_JSON, json, n);
  send_built(n);
}

static void send_error(long long id, const char *code, const char *message, int err) {
  char text[PATH_BYTES + 256], escaped[2 * PATH_BYTES + 600];
  if (err) snprintf(text, sizeof text, "%s: %s", message, strerror(err));
  else snprintf(text, sizeof text, "%s", message);
  json_escape(text, escaped, sizeof escaped);
  int n = snprintf(OUT_JSON, OUT_CAP, "{\"id\":%lld,\"kind\":\"error\",\"code\":\"%s\",\"message\":\"%s\"}", id, code, escaped);
  if (n > 0 && (size_t)n < OUT_CAP) send_built((size_t)n);
}

/* --- exec: commands the gate runs, as the agent's runExec runs them --- */

typedef struct {
  int used;
  long long id;
  pid_t pid;
  int out_fd, err_fd;
  int exited, status;
  int timed_out, cancelled, orphaned;
  double started, deadline, exited_at, last_output;
} native_call;

static native_call calls[NATIVE_MAX_CALLS];
static int lingering[NATIVE_MAX_LINGERING];
static size_t lingering_n = 0;

static native_call *find_call(long long id) {
  for (size_t i = 0; i < NATIVE_MAX_CALLS; i++)
    if (calls[i].used && calls[i].id == id) return &calls[i];
  return NULL;
}

static size_t calls_in_flight(void) {
  size_t n = 0;
  for (size_t i = 0; i < NATIVE_MAX_CALLS; i++) n += calls[i].used ? 1u : 0u;
  return n;
}

static void kill_group(native_call *call) {
  if (kill(-call->pid, SIGKILL) < 0) kill(call->pid, SIGKILL);
}

static const char *signal_name(int sig) {
  static const char *const names[32] = {NULL,      "SIGHUP",  "SIGINT",    "SIGQUIT", "SIGILL",    "SIGTRAP", "SIGABRT", "SIGBUS",
                                "SIGFPE",  "SIGKILL", "SIGUSR1",   "SIGSEGV", "SIGUSR2",   "SIGPIPE", "SIGALRM", "SIGTERM",
                                "SIGSTKFLT", "SIGCHLD", "SIGCONT", "SIGSTOP", "SIGTSTP",   "SIGTTIN", "SIGTTOU", "SIGURG",
                                "SIGXCPU", "SIGXFSZ", "SIGVTALRM", "SIGPROF", "SIGWINCH",  "SIGIO",   "SIGPWR",  "SIGSYS"};
  if (sig <= 0 || sig >= 32) return NULL;
  return names[sig];
}

static void send_chunk(long long id, const char *stream, const unsigned char *data, size_t n) {
  static char encoded[OUTPUT_READ_BYTES / 3 * 4 + 8];
  base64_encode(data, n, encoded);
  int len = snprintf(OUT_JSON, OUT_CAP, "{\"id\":%lld,\"kind\":\"chunk\",\"stream\":\"%s\",\"data\":\"%s\"}", id, stream, encoded);
  if (len > 0 && (size_t)len < OUT_CAP) send_built((size_t)len);
}

static void linger_or_close(int fd) {
  if (fd < 0) return;
  /* What a finished command left running may still write here: read and dropped, so it does not die of SIGPIPE. */
  if (lingering_n < NATIVE_MAX_LINGERING) lingering[lingering_n++] = fd;
  else close(fd);
}

static void finish_call(native_call *call) {
  double duration = mono_ms() - call->started;
  if (!call->orphaned) {
    if (call->cancelled && !call->timed_out) {
      send_error(call->id, "cancelled", "exec was cancelled by the host", 0);
    } else {
      char code[32] = "null", sig[40] = "null";
      if (WIFEXITED(call->status)) snprintf(code, sizeof code, "%d", WEXITSTATUS(call->status));
      else if (WIFSIGNALED(call->status) && signal_name(WTERMSIG(call->status)))
        snprintf(sig, sizeof sig, "\"%s\"", signal_name(WTERMSIG(call->status)));
      int n = snprintf(OUT_JSON, OUT_CAP,
                       "{\"id\":%lld,\"kind\":\"result\",\"value\":{\"exitCode\":%s,\"signal\":%s,\"timedOut\":%s,\"durationMs\":%.3f}}",
                       call->id, code, sig, call->timed_out ? "true" : "false", duration);
      if (n > 0 && (size_t)n < OUT_CAP) send_built((size_t)n);
    }
  }
  linger_or_close(call->out_fd);
  linger_or_close(call->err_fd);
  memset(call, 0, sizeof *call);
  call->out_fd = call->err_fd = -1;
}

static void read_output(native_call *call, int *fd, const char *stream) {
  static unsigned char buf[OUTPUT_READ_BYTES];
  ssize_t n = read(*fd, buf, sizeof buf);
  if (n < 0 && (errno == EINTR || errno == EAGAIN)) return;
  if (n <= 0) {
    close(*fd);
    *fd = -1;
    return;
  }
  call->last_output = mono_ms();
  if (!call->orphaned) send_chunk(call->id, stream, buf, (size_t)n);
}

/* Exited and its output in: at both pipes' end, or when they have gone quiet after the exit (ops/exec.ts whenExitSettled). */
static void settle_calls(void) {
  double now = mono_ms();
  for (size_t i = 0; i < NATIVE_MAX_CALLS; i++) {
    native_call *call = &calls[i];
    if (!call->used) continue;
    if (!call->exited && call->deadline > 0 && now >= call->deadline && !call->timed_out) {
      call->timed_out = 1;
      kill_group(call);
    }
    if (!call->exited) continue;
    double last = call->last_output > call->exited_at ? call->last_output : call->exited_at;
    if ((call->out_fd < 0 && call->err_fd < 0) || now - last >= EXIT_QUIET_MS || now - call->exited_at >= EXIT_GRACE_MS) finish_call(call);
  }
}

static void reap_children(void) {
  for (;;) {
    int status = 0;
    pid_t pid = waitpid(-1, &status, WNOHANG);
    if (pid <= 0) return;
    for (size_t i = 0; i < NATIVE_MAX_CALLS; i++) {
      if (calls[i].used && calls[i].pid == pid && !calls[i].exited) {
        calls[i].exited = 1;
        calls[i].status = status;
        calls[i].exited_at = mono_ms();
      }
    }
  }
}

/* PATH lookup as execvp does it, so the gate knows before forking whether the program is there. 0 found, else an errno. */
static int resolve_program(const char *file, const char *path_env, char *out, size_t cap) {
  struct stat st;
  if (strchr(file, '/')) {
    /* Relative to the command's working directory: the agent's to resolve. */
    if (file[0] != '/' || strlen(file) >= cap) return EINVAL;
    strcpy(out, file);
    if (stat(out, &st) < 0) return errno;
    if (!S_ISREG(st.st_mode)) return EINVAL;
    return access(out, X_OK) == 0 ? 0 : errno;
  }
  const char *p = path_env ? path_env : "/bin:/usr/bin";
  int seen_eacces = 0;
  for (;;) {
    const char *colon = strchr(p, ':');
    size_t dn = colon ? (size_t)(colon - p) : strlen(p);
    /* A directory relative to the command's working directory: the agent's to search. */
    if (dn == 0 || p[0] != '/') return EINVAL;
    if (dn + 1 + strlen(file) < cap) {
      memcpy(out, p, dn);
      out[dn] = '/';
      strcpy(out + dn + 1, file);
      if (stat(out, &st) == 0 && S_ISREG(st.st_mode)) {
        if (access(out, X_OK) == 0) return 0;
        seen_eacces = 1;
      }
    }
    if (!colon) break;
    p = colon + 1;
  }
  return seen_eacces ? EACCES : ENOENT;
}

static const char *const DEFAULT_ENV[][2] = {
    {"PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}, {"HOME", "/root"}, {"TERM", "dumb"}, {"LANG", "C.UTF-8"}};

/* 1: answered (or running) here; 0: the agent's to answer. */
static int native_exec(long long id, const request *r) {
  /* The agent's validateExec, validateTimeout and validateEnv: a request they refuse is the agent's to refuse. */
  if (r->has_argv == r->has_cmd) return 0;
  if (r->has_argv && (r->argc == 0 || r->argv[0][0] == '\0')) return 0;
  if (r->has_cmd) {
    size_t k = 0;
    while (k < r->cmd_n && strchr(" \t\n\r\v\f", r->cmd[k])) k++;
    if (k == r->cmd_n) return 0;
  }
  if (r->has_timeout && !(r->timeout_ms >= 1 && r->timeout_ms <= MAX_EXEC_TIMEOUT_MS && r->timeout_ms == (double)(long long)r->timeout_ms))
    return 0;
  for (size_t k = 0; k < r->env_n; k++)
    if (r->env_keys[k][0] == '\0' || strchr(r->env_keys[k], '=')) return 0;
  if (find_call(id) || calls_in_flight() >= NATIVE_MAX_CALLS) return 0;
  static unsigned char stdin_bytes[NATIVE_MAX_STDIN_BYTES];
  size_t stdin_n = 0;
  if (r->has_stdin && base64_decode(r->stdin_b64, r->stdin_n, stdin_bytes, sizeof stdin_bytes, &stdin_n) < 0) return 0;
  /* The working directory must plainly be one: how spawn fails otherwise is Node's to word. */
  const char *cwd = r->has_cwd ? r->cwd : "/root";
  struct stat st;
  if (stat(cwd, &st) < 0 || !S_ISDIR(st.st_mode) || access(cwd, X_OK) < 0) return 0;

  /* The environment: the agent's defaults, then the request's (a name given again takes the later value). */
  char *envp[NATIVE_MAX_ENV + 8];
  static char env_text[GATE_MAX_FRAME + 512];
  size_t env_used = 0, envc = 0;
  const char *path_env = NULL;
  for (size_t k = 0; k < 4 + r->env_n; k++) {
    const char *key = k < 4 ? DEFAULT_ENV[k][0] : r->env_keys[k - 4];
    const char *value = k < 4 ? DEFAULT_ENV[k][1] : r->env_values[k - 4];
    if (k < 4) {
      int overridden = 0;
      for (size_t j = 0; j < r->env_n; j++) overridden |= strcmp(r->env_keys[j], key) == 0;
      if (overridden) {
        for (size_t j = 0; j < r->env_n; j++)
          if (strcmp(r->env_keys[j], key) == 0) value = r->env_values[j];
      }
    } else {
      int is_default = 0;
      for (size_t j = 0; j < 4; j++) is_default |= strcmp(DEFAULT_ENV[j][0], key) == 0;
      if (is_default) continue;
    }
    size_t need = strlen(key) + 1 + strlen(value) + 1;
    if (env_used + need > sizeof env_text) return 0;
    char *entry = env_text + env_used;
    snprintf(entry, need, "%s=%s", key, value);
    env_used += need;
    envp[envc++] = entry;
    if (strcmp(key, "PATH") == 0) path_env = value;
  }
  envp[envc] = NULL;

  const char *file = r->has_argv ? r->argv[0] : "/bin/sh";
  static char sh[] = "/bin/sh", dash_c[] = "-c";
  char *sh_argv[] = {sh, dash_c, r->cmd, NULL};
  char *const *argv = r->has_argv ? r->argv : sh_argv;
  char program[PATH_BYTES];
  int found = resolve_program(file, path_env, program, sizeof program);
  if (found != 0 && found != ENOENT) return 0;

  native_call *call = NULL;
  for (size_t i = 0; i < NATIVE_MAX_CALLS && !call; i++)
    if (!calls[i].used) call = &calls[i];
  if (!call) return 0;
  double started = mono_ms();
  if (found == ENOENT) {
    /* Mirror a shell, as the agent does: a missing program is exit 127. */
    char message[PATH_BYTES + 64];
    snprintf(message, sizeof message, "forkd: %s: command not found\n", file);
    send_chunk(id, "stderr", (const unsigned char *)message, strlen(message));
    int n = snprintf(OUT_JSON, OUT_CAP,
                     "{\"id\":%lld,\"kind\":\"result\",\"value\":{\"exitCode\":127,\"signal\":null,\"timedOut\":false,\"durationMs\":%.3f}}", id,
                     mono_ms() - started);
    if (n > 0 && (size_t)n < OUT_CAP) send_built((size_t)n);
    return 1;
  }
  int in_pipe[2], out_pipe[2], err_pipe[2];
  if (pipe2(in_pipe, O_CLOEXEC) < 0) return 0;
  if (pipe2(out_pipe, O_CLOEXEC) < 0) {
    close(in_pipe[0]);
    close(in_pipe[1]);
    return 0;
  }
  if (pipe2(err_pipe, O_CLOEXEC) < 0) {
    close(in_pipe[0]);
    close(in_pipe[1]);
    close(out_pipe[0]);
    close(out_pipe[1]);
    return 0;
  }
  pid_t pid = fork();
  if (pid == 0) {
    /* The child: its own process group (a timeout or cancel kills all it starts), default signals, the pipes. */
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    signal(SIGPIPE, SIG_DFL);
    setsid();
    if (dup2(in_pipe[0], 0) < 0 || dup2(out_pipe[1], 1) < 0 || dup2(err_pipe[1], 2) < 0 || chdir(cwd) < 0) _exit(127);
    execve(program, argv, envp);
    if (errno == ENOEXEC) {
      /* As execvp: a script without a #! line runs under /bin/sh. */
      char *script[NATIVE_MAX_ARGS + 3];
      size_t k = 0;
      script[k++] = sh;
      script[k++] = program;
      for (size_t j = 1; argv[j] && k < NATIVE_MAX_ARGS + 2; j++) script[k++] = argv[j];
      script[k] = NULL;
      execve(sh, script, envp);
    }
    _exit(127);
  }
  close(in_pipe[0]);
  close(out_pipe[1]);
  close(err_pipe[1]);
  if (pid < 0) {
    close(in_pipe[1]);
    close(out_pipe[0]);
    close(err_pipe[0]);
    return 0;
  }
  /* Within the pipe's capacity, so this write does not wait for the command to read it. */
  int flags = fcntl(in_pipe[1], F_GETFL);
  if (flags >= 0) fcntl(in_pipe[1], F_SETFL, flags | O_NONBLOCK);
  if (stdin_n > 0) (void)write_all(in_pipe[1], stdin_bytes, stdin_n);
  close(in_pipe[1]);
  memset(call, 0, sizeof *call);
  call->used = 1;
  call->id = id;
  call->pid = pid;
  call->out_fd = out_pipe[0];
  call->err_fd = err_pipe[0];
  call->started = started;
  call->deadline = r->has_timeout ? started + r->timeout_ms : 0;
  return 1;
}

/* --- files: read, write, stat, as the agent's runFiles --- */

/* path.normalize for an absolute path; -1 where the gate would not be sure to agree (the agent then answers). */
static int normalize_path(const char *in, char *out, size_t cap) {
  size_t n = strlen(in);
  if (n == 0 || in[0] != '/' || n >= cap || in[n - 1] == '/') return -1;
  size_t o = 0;
  const char *p = in;
  while (*p) {
    while (*p == '/') p++;
    if (!*p) break;
    const char *end = strchr(p, '/');
    size_t len = end ? (size_t)(end - p) : strlen(p);
    if (len == 1 && p[0] == '.') {
      /* nothing */
    } else if (len == 2 && p[0] == '.' && p[1] == '.') {
      while (o > 0 && out[o - 1] != '/') o--;
      if (o > 0) o--;
    } else {
      out[o++] = '/';
      memcpy(out + o, p, len);
      o += len;
    }
    p += len;
  }
  if (o == 0) out[o++] = '/';
  out[o] = '\0';
  return 0;
}

/* The agent's fsError, for the errors it words itself; 0 for the others (the agent answers those). */
static int fs_error(long long id, int err, const char *target) {
  char message[PATH_BYTES + 64];
  const char *code;
  switch (err) {
    case ENOENT: code = "not_found"; snprintf(message, sizeof message, "no such file or directory: %s", target); break;
    case EEXIST: code = "exists"; snprintf(message, sizeof message, "already exists: %s", target); break;
    case ENOTDIR: code = "not_a_directory"; snprintf(message, sizeof message, "not a directory: %s", target); break;
    case EISDIR: code = "is_a_directory"; snprintf(message, sizeof message, "is a directory: %s", target); break;
    case EACCES:
    case EPERM: code = "permission_denied"; snprintf(message, sizeof message, "permission denied: %s", target); break;
    default: return 0;
  }
  send_error(id, code, message, 0);
  return 1;
}

static const char *entry_type(mode_t mode) {
  if (S_ISREG(mode)) return "file";
  if (S_ISDIR(mode)) return "dir";
  if (S_ISLNK(mode)) return "symlink";
  return "other";
}

static int read_file(long long id, const char *target, const char *escaped) {
  struct stat st;
  if (stat(target, &st) < 0) return fs_error(id, errno, target);
  if (S_ISDIR(st.st_mode)) {
    char message[PATH_BYTES + 32];
    snprintf(message, sizeof message, "is a directory: %s", target);
    send_error(id, "is_a_directory", message, 0);
    return 1;
  }
  if (!S_ISREG(st.st_mode) || st.st_size > NATIVE_MAX_READ_BYTES) return 0;
  int fd = open(target, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return fs_error(id, errno, target);
  static unsigned char data[NATIVE_MAX_READ_BYTES + 1];
  size_t got = 0;
  for (;;) {
    ssize_t n = read(fd, data + got, sizeof data - got);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      close(fd);
      return 0;
    }
    if (n == 0) break;
    got += (size_t)n;
    if (got == sizeof data) {
      /* It grew past what the gate reads: the agent reads it. */
      close(fd);
      return 0;
    }
  }
  close(fd);
  int head = snprintf(OUT_JSON, OUT_CAP, "{\"id\":%lld,\"kind\":\"result\",\"value\":{\"path\":\"%s\",\"size\":%zu,\"data\":\"", id, escaped, got);
  if (head <= 0 || (size_t)head + (got + 2) / 3 * 4 + 8 > OUT_CAP) return 0;
  size_t n = (size_t)head + base64_encode(data, got, OUT_JSON + head);
  memcpy(OUT_JSON + n, "\"}}", 3);
  send_built(n + 3);
  return 1;
}

static int stat_file(long long id, const char *target, const char *escaped) {
  struct stat st;
  if (lstat(target, &st) < 0) return fs_error(id, errno, target);
  /* Node's mtimeMs: seconds * 1e3 + nanoseconds / 1e6, a double printed so it reads back the same. */
  double mtime = (double)st.st_mtim.tv_sec * 1e3 + (double)st.st_mtim.tv_nsec / 1e6;
  char mtext[40] = "";
  for (int precision = 1; precision <= 17 && mtext[0] == '\0'; precision++) {
    char candidate[40];
    snprintf(candidate, sizeof candidate, "%.*g", precision, mtime);
    if (strtod(candidate, NULL) == mtime && !strchr(candidate, 'e')) memcpy(mtext, candidate, sizeof mtext);
  }
  if (mtext[0] == '\0') return 0;
  int n = snprintf(OUT_JSON, OUT_CAP,
                   "{\"id\":%lld,\"kind\":\"result\",\"value\":{\"path\":\"%s\",\"type\":\"%s\",\"size\":%lld,\"mode\":%u,\"mtimeMs\":%s}}", id,
                   escaped, entry_type(st.st_mode), (long long)st.st_size, (unsigned)(st.st_mode & 07777), mtext);
  if (n <= 0 || (size_t)n >= OUT_CAP) return 0;
  send_built((size_t)n);
  return 1;
}

static int write_file(long long id, const request *r, const char *target, const char *escaped) {
  static unsigned char data[GATE_MAX_FRAME];
  size_t n = 0;
  if (!r->has_data || base64_decode(r->data, r->data_n, data, sizeof data, &n) < 0) return 0;
  if (r->has_mode && !(r->mode >= 0 && r->mode <= 07777 && r->mode == (double)(int)r->mode)) return 0;
  mode_t mode = r->has_mode ? (mode_t)r->mode : 0644;
  if (r->append) {
    int fd = open(target, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, mode);
    if (fd < 0) return fs_error(id, errno, target);
    int failed = write_all(fd, data, n) < 0 ? errno : 0;
    close(fd);
    if (failed) return fs_error(id, failed, target);
    struct stat st;
    if (stat(target, &st) < 0) return fs_error(id, errno, target);
    int len = snprintf(OUT_JSON, OUT_CAP, "{\"id\":%lld,\"kind\":\"result\",\"value\":{\"path\":\"%s\",\"size\":%lld}}", id, escaped,
                       (long long)st.st_size);
    if (len > 0 && (size_t)len < OUT_CAP) send_built((size_t)len);
    return 1;
  }
  /* @forkd/atomic's writeFileAtomic: a temp file beside the target (O_EXCL, no link followed), fsync, rename, fsync the dir. */
  const char *slash = strrchr(target, '/');
  if (!slash || slash[1] == '\0') return 0;
  char dir[PATH_BYTES], temp[PATH_BYTES + 64];
  size_t dir_n = slash == target ? 1 : (size_t)(slash - target);
  memcpy(dir, target, dir_n);
  dir[dir_n] = '\0';
  unsigned char random_bytes[6];
  int rnd = open("/dev/urandom", O_RDONLY | O_CLOEXEC);
  if (rnd < 0 || read(rnd, random_bytes, sizeof random_bytes) != (ssize_t)sizeof random_bytes) {
    if (rnd >= 0) close(rnd);
    return 0;
  }
  close(rnd);
  snprintf(temp, sizeof temp, "%s/.%s.%02x%02x%02x%02x%02x%02x.tmp", dir_n == 1 ? "" : dir, slash + 1, random_bytes[0], random_bytes[1],
           random_bytes[2], random_bytes[3], random_bytes[4], random_bytes[5]);
  int fd = open(temp, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, mode);
  if (fd < 0) return fs_error(id, errno, target);
  int failed = write_all(fd, data, n) < 0 || fsync(fd) < 0 ? errno : 0;
  close(fd);
  if (!failed && rename(temp, target) < 0) failed = errno;
  if (failed) {
    unlink(temp);
    return fs_error(id, failed, target);
  }
  int dfd = open(dir, O_RDONLY | O_CLOEXEC);
  if (dfd >= 0) {
    fsync(dfd);
    close(dfd);
  }
  int len = snprintf(OUT_JSON, OUT_CAP, "{\"id\":%lld,\"kind\":\"result\",\"value\":{\"path\":\"%s\",\"size\":%zu}}", id, escaped, n);
  if (len > 0 && (size_t)len < OUT_CAP) send_built((size_t)len);
  return 1;
}

static int native_files(long long id, const request *r) {
  if (!r->has_action || !r->has_path || r->path_n == 0) return 0;
  char target[PATH_BYTES], escaped[2 * PATH_BYTES];
  if (normalize_path(r->path, target, sizeof target) < 0) return 0;
  json_escape(target, escaped, sizeof escaped);
  if (strlen(escaped) + 8 >= sizeof escaped) return 0;
  if (r->action_n == 4 && memcmp(r->action, "read", 4) == 0) return read_file(id, target, escaped);
  if (r->action_n == 4 && memcmp(r->action, "stat", 4) == 0) return stat_file(id, target, escaped);
  if (r->action_n == 5 && memcmp(r->action, "write", 5) == 0) return write_file(id, r, target, escaped);
  return 0;
}

/* 1: answered here; 0: the agent's to answer. */
static int gate_answer(const unsigned char *body, size_t len) {
  static request r;
  if (parse_request(body, len, &r) < 0 || !r.has_id || !r.op || r.unsure) return 0;
  if (r.id < 0 || r.id > 9007199254740991.0 || r.id != (double)(long long)r.id) return 0;
  long long id = (long long)r.id;
  /* One of the gate's commands still running under this id: the agent refuses the duplicate. */
  if (find_call(id)) return 0;
  if (r.op_n == 4 && memcmp(r.op, "ping", 4) == 0) {
    char host[256] = "", escaped[600], json[1000];
    gethostname(host, sizeof host - 1);
    json_escape(host, escaped, sizeof escaped);
    snprintf(json, sizeof json,
             "{\"id\":%lld,\"kind\":\"result\",\"value\":{\"version\":\"%s\",\"uptimeMs\":%lld,\"runtimes\":[%s],"
             "\"hostname\":\"%s\",\"inFlight\":%zu,\"stats\":{\"gate\":true}}}",
             id, gate_version, now_ms() - gate_started_ms, gate_runtimes, escaped, calls_in_flight());
    send_frame(json);
    return 1;
  }
  if (r.op_n == 6 && memcmp(r.op, "cancel", 6) == 0) {
    if (!r.has_target) return 0;
    native_call *call = r.target == (double)(long long)r.target ? find_call((long long)r.target) : NULL;
    if (call) {
      call->cancelled = 1;
      kill_group(call);
    }
    char json[120];
    snprintf(json, sizeof json, "{\"id\":%lld,\"kind\":\"result\",\"value\":{\"cancelled\":%s}}", id, call ? "true" : "false");
    send_frame(json);
    return 1;
  }
  if (r.op_n == 4 && memcmp(r.op, "exec", 4) == 0) return !r.unknown_field && native_exec(id, &r);
  if (r.op_n == 5 && memcmp(r.op, "files", 5) == 0) return !r.unknown_field && native_files(id, &r);
  if (r.op_n == 5 && memcmp(r.op, "clock", 5) == 0) {
    /* The host's clock again after a long silence: nothing else changes. */
    if (!r.has_clock || !(r.clock_ms > 0 && r.clock_ms < 1e15)) return 0;
    errno = 0;
    const char *err = set_clock_ms((long long)(r.clock_ms + 0.5));
    if (err) {
      send_error(id, "io_error", err, errno);
      return 1;
    }
    char json[120];
    snprintf(json, sizeof json, "{\"id\":%lld,\"kind\":\"result\",\"value\":{\"applied\":[\"clock\"]}}", id);
    send_frame(json);
    return 1;
  }
  if (!(r.op_n == 8 && memcmp(r.op, "identity", 8) == 0)) return 0;
  /* Only the usual identity (all three fields, plainly valid) is answered here. */
  if (!r.has_hostname || !r.has_entropy || !r.has_clock) return 0;
  if (!valid_hostname(r.hostname, r.hostname_n) || !(r.clock_ms > 0 && r.clock_ms < 1e15)) return 0;
  struct entropy_req req;
  size_t n = 0;
  if (base64_decode(r.entropy, r.entropy_n, req.buf, sizeof req.buf, &n) < 0 || n < 16) return 0;
  char host[64];
  memcpy(host, r.hostname, r.hostname_n);
  host[r.hostname_n] = '\0';
  long long ms = (long long)(r.clock_ms + 0.5); /* Math.round, as the agent does */
  const char *err = NULL;
  errno = 0;
  if (sethostname(host, r.hostname_n) < 0) err = "sethostname failed";
  if (!err) err = reseed_bytes(&req, n);
  if (!err) err = set_clock_ms(ms);
  if (err) {
    send_error(id, "io_error", err, errno);
    return 1;
  }
  /* A restored child's first call from its own host: what still runs was its parent's host's, whose output nobody here reads. */
  for (size_t i = 0; i < NATIVE_MAX_CALLS; i++)
    if (calls[i].used) calls[i].orphaned = 1;
  char json[200];
  snprintf(json, sizeof json, "{\"id\":%lld,\"kind\":\"result\",\"value\":{\"applied\":[\"hostname\",\"entropy\",\"clock\"]}}", id);
  send_frame(json);
  return 1;
}

/* The host left: what it started is stopped and its answers dropped, as the agent's abortAll does. */
static void abort_calls(void) {
  for (size_t i = 0; i < NATIVE_MAX_CALLS; i++) {
    if (!calls[i].used) continue;
    calls[i].orphaned = 1;
    calls[i].cancelled = 1;
    kill_group(&calls[i]);
  }
}

/* --- the loop: the port (while parked), the agent's lines, the commands' pipes, SIGIO and SIGCHLD --- */

static unsigned char in_frame[4 + GATE_MAX_FRAME];
static size_t in_have = 0;  /* bytes of in_frame read so far (header, then body) */
static int host_absent = 0; /* the port's read returned 0: sleep until SIGIO, or a minute */

static void hand_over(size_t n) {
  for (size_t i = 0; i < NATIVE_MAX_CALLS; i++) {
    if (!calls[i].used) continue;
    char text[32];
    int len = snprintf(text, sizeof text, "%lld", calls[i].id);
    to_agent('N', (const unsigned char *)text, (size_t)len);
  }
  gate_parked = 0;
  fcntl(gate_port, F_SETOWN, getppid());
  to_agent('F', in_frame, n);
  in_have = 0;
}

/* Read what the port has of the frame in progress, never past its end (what follows may be the agent's). */
static void read_port(void) {
  size_t want;
  if (in_have < 4) {
    want = 4 - in_have;
  } else {
    size_t len = (size_t)in_frame[0] << 24 | (size_t)in_frame[1] << 16 | (size_t)in_frame[2] << 8 | in_frame[3];
    want = 4 + len - in_have;
  }
  ssize_t n = read(gate_port, in_frame + in_have, want);
  if (n < 0 && (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK)) return;
  if (n <= 0) {
    /* No host (or it left mid-frame: that frame died with it, and so do the calls it started). */
    in_have = 0;
    host_absent = 1;
    abort_calls();
    return;
  }
  in_have += (size_t)n;
  if (in_have < 4) return;
  size_t len = (size_t)in_frame[0] << 24 | (size_t)in_frame[1] << 16 | (size_t)in_frame[2] << 8 | in_frame[3];
  if (len > GATE_MAX_FRAME) {
    hand_over(4); /* the agent reads the rest itself */
    return;
  }
  if (in_have < 4 + len) return;
  if (gate_answer(in_frame + 4, len)) in_have = 0;
  else hand_over(4 + len);
}

static char agent_line[128];
static size_t agent_line_n = 0;

static void agent_says(const char *line) {
  long long id = 0;
  if (line[0] == 'P' && sscanf(line + 1, " %lld", &id) == 1) {
    /* The port is ours: its SIGIO too, until the agent has it back. */
    fcntl(gate_port, F_SETOWN, getpid());
    gate_parked = 1;
    host_absent = 0;
    char json[120];
    snprintf(json, sizeof json, "{\"id\":%lld,\"kind\":\"result\",\"value\":{\"parked\":true}}", id);
    send_frame(json);
  } else if (line[0] == 'C' && sscanf(line + 1, " %lld", &id) == 1) {
    native_call *call = find_call(id);
    if (call) {
      call->cancelled = 1;
      kill_group(call);
    }
  } else if (line[0] == 'A') {
    abort_calls();
  }
}

static void read_agent(void) {
  char buf[256];
  ssize_t n = read(0, buf, sizeof buf);
  if (n < 0 && (errno == EINTR || errno == EAGAIN)) return;
  if (n <= 0) exit(0); /* the agent is gone */
  for (ssize_t i = 0; i < n; i++) {
    if (buf[i] == '\n') {
      agent_line[agent_line_n] = '\0';
      agent_says(agent_line);
      agent_line_n = 0;
    } else if (agent_line_n + 1 < sizeof agent_line) {
      agent_line[agent_line_n++] = buf[i];
    }
  }
}

static int gate(const char *version, const char *runtimes, const char *started) {
  gate_version = version;
  gate_runtimes = runtimes;
  gate_started_ms = atoll(started);
  /* Die with the agent: a gate left holding the port would keep a restarted agent out. */
  prctl(PR_SET_PDEATHSIG, SIGKILL);
  pid_t agent = getppid();
  if (agent == 1) return 0;
  for (size_t i = 0; i < NATIVE_MAX_CALLS; i++) calls[i].out_fd = calls[i].err_fd = -1;
  /* The commands the gate starts get the pipes they are given, not the port. */
  fcntl(gate_port, F_SETFD, FD_CLOEXEC);
  sigset_t sigs;
  sigemptyset(&sigs);
  sigaddset(&sigs, SIGIO);
  sigaddset(&sigs, SIGCHLD);
  sigprocmask(SIG_BLOCK, &sigs, NULL);
  int sfd = signalfd(-1, &sigs, SFD_CLOEXEC | SFD_NONBLOCK);
  if (sfd < 0) return 1;
  signal(SIGPIPE, SIG_IGN);
  int flags = fcntl(gate_port, F_GETFL);
  if (flags < 0 || fcntl(gate_port, F_SETOWN, agent) < 0 || fcntl(gate_port, F_SETFL, flags | O_ASYNC) < 0) {
    const char *why = strerror(errno);
    to_agent('s', (const unsigned char *)why, strlen(why));
  } else {
    to_agent('S', NULL, 0);
  }
  double host_absent_since = 0;
  for (;;) {
    struct pollfd fds[3 + 2 * NATIVE_MAX_CALLS + NATIVE_MAX_LINGERING];
    native_call *owner[3 + 2 * NATIVE_MAX_CALLS + NATIVE_MAX_LINGERING];
    nfds_t nfds = 0;
    fds[nfds] = (struct pollfd){.fd = 0, .events = POLLIN};
    owner[nfds++] = NULL;
    fds[nfds] = (struct pollfd){.fd = sfd, .events = POLLIN};
    owner[nfds++] = NULL;
    int port_slot = -1;
    if (gate_parked && !host_absent) {
      port_slot = (int)nfds;
      fds[nfds] = (struct pollfd){.fd = gate_port, .events = POLLIN};
      owner[nfds++] = NULL;
    }
    nfds_t pipes_start = nfds;
    for (size_t i = 0; i < NATIVE_MAX_CALLS; i++) {
      if (!calls[i].used) continue;
      if (calls[i].out_fd >= 0) {
        fds[nfds] = (struct pollfd){.fd = calls[i].out_fd, .events = POLLIN};
        owner[nfds++] = &calls[i];
      }
      if (calls[i].err_fd >= 0) {
        fds[nfds] = (struct pollfd){.fd = calls[i].err_fd, .events = POLLIN};
        owner[nfds++] = &calls[i];
      }
    }
    nfds_t linger_start = nfds;
    for (size_t i = 0; i < lingering_n; i++) {
      fds[nfds] = (struct pollfd){.fd = lingering[i], .events = POLLIN};
      owner[nfds++] = NULL;
    }
    /* Wake for the commands' settle and deadline clocks; a minute at most while the host is away. */
    int timeout = host_absent ? 60000 : -1;
    if (calls_in_flight() > 0) timeout = EXIT_QUIET_MS / 2;
    if (host_absent && host_absent_since == 0) host_absent_since = mono_ms();
    int ready = poll(fds, nfds, timeout);
    if (ready < 0 && errno != EINTR) return 1;
    if (host_absent && mono_ms() - host_absent_since >= 60000) host_absent = 0;
    if (ready > 0) {
      if (fds[1].revents & POLLIN) {
        struct signalfd_siginfo info;
        while (read(sfd, &info, sizeof info) == (ssize_t)sizeof info) {
          if (info.ssi_signo == SIGIO) host_absent = 0;
        }
        reap_children();
      }
      for (nfds_t k = pipes_start; k < linger_start; k++) {
        native_call *call = owner[k];
        if (!call || !(fds[k].revents & (POLLIN | POLLHUP | POLLERR))) continue;
        if (fds[k].fd == call->out_fd) read_output(call, &call->out_fd, "stdout");
        else if (fds[k].fd == call->err_fd) read_output(call, &call->err_fd, "stderr");
      }
      for (nfds_t k = linger_start; k < nfds; k++) {
        if (!(fds[k].revents & (POLLIN | POLLHUP | POLLERR))) continue;
        char drop[4096];
        if (read(fds[k].fd, drop, sizeof drop) > 0) continue;
        close(fds[k].fd);
        for (size_t i = 0; i < lingering_n; i++) {
          if (lingering[i] == fds[k].fd) {
            lingering[i] = lingering[--lingering_n];
            break;
          }
        }
      }
      if (port_slot >= 0 && (fds[port_slot].revents & (POLLIN | POLLHUP | POLLERR)) && gate_parked) read_port();
      if (fds[0].revents & (POLLIN | POLLHUP | POLLERR)) read_agent();
    }
    if (!host_absent) host_absent_since = 0;
    reap_children();
    settle_calls();
  }
}

static int settime(const char *ms_text) {
  char *end = NULL;
  errno = 0;
  long long ms = strtoll(ms_text, &end, 10);
  if (errno != 0 || end == ms_text || *end != '\0' || ms < 0) {
    fprintf(stderr, "forkd-guestctl: settime wants milliseconds since the epoch, got '%s'\n", ms_text);
    return 2;
  }
  struct timespec ts = {.tv_sec = ms / 1000, .tv_nsec = (ms % 1000) * 1000000L};
  if (clock_settime(CLOCK_REALTIME, &ts) < 0) { perror("clock_settime"); return 1; }
  return 0;
}

static int set_fasync(const char *fd_text, const char *pid_text) {
  int fd = atoi(fd_text);
  int pid = atoi(pid_text);
  if (fd < 0 || pid <= 0) { fprintf(stderr, "forkd-guestctl: fasync wants FD PID\n"); return 2; }
  if (fcntl(fd, F_SETOWN, pid) < 0) { perror("F_SETOWN"); return 1; }
  int flags = fcntl(fd, F_GETFL);
  if (flags < 0 || fcntl(fd, F_SETFL, flags | O_ASYNC) < 0) { perror("F_SETFL O_ASYNC"); return 1; }
  return 0;
}

static int parse_dimension(const char *text, unsigned short *out) {
  char *end = NULL;
  long v = strtol(text, &end, 10);
  if (end == text || *end != '\0' || v < 1 || v > 1000) return -1;
  *out = (unsigned short)v;
  return 0;
}

/*
 * The pty relay. The shell runs as the session leader of a new pseudo-terminal
 * (so job control, echo and line editing work); bytes on our stdin go to the
 * terminal, what it prints comes out on our stdout. Ends with the shell: its
 * exit status is ours (128+signal when killed).
 */
static int pty_run(int argc, char **argv) {
  struct winsize ws = {0};
  if (parse_dimension(argv[2], &ws.ws_row) < 0 || parse_dimension(argv[3], &ws.ws_col) < 0) {
    fprintf(stderr, "forkd-guestctl: pty wants ROWS COLS (1-1000) PROG [ARG...]\n");
    return 2;
  }
  int master = posix_openpt(O_RDWR | O_NOCTTY);
  if (master < 0 || grantpt(master) < 0 || unlockpt(master) < 0) { perror("forkd-guestctl: posix_openpt"); return 1; }
  const char *slave_name = ptsname(master);
  if (!slave_name) { perror("forkd-guestctl: ptsname"); return 1; }
  char slave_path[128];
  snprintf(slave_path, sizeof slave_path, "%s", slave_name);
  if (ioctl(master, TIOCSWINSZ, &ws) < 0) { perror("forkd-guestctl: TIOCSWINSZ"); return 1; }
  pid_t child = fork();
  if (child < 0) { perror("forkd-guestctl: fork"); return 1; }
  if (child == 0) {
    close(master);
    if (setsid() < 0) _exit(127);
    int slave = open(slave_path, O_RDWR);
    if (slave < 0 || ioctl(slave, TIOCSCTTY, 0) < 0) _exit(127);
    if (dup2(slave, 0) < 0 || dup2(slave, 1) < 0 || dup2(slave, 2) < 0) _exit(127);
    if (slave > 2) close(slave);
    setenv("TERM", "xterm-256color", 0);
    execvp(argv[4], &argv[4]);
    _exit(127);
  }
  (void)argc;
  struct pollfd fds[2] = {{.fd = 0, .events = POLLIN}, {.fd = master, .events = POLLIN}};
  char buf[16384];
  for (;;) {
    int ready = poll(fds, 2, -1);
    if (ready < 0) {
      if (errno == EINTR) continue;
      break;
    }
    if (fds[1].revents & (POLLIN | POLLHUP | POLLERR)) {
      ssize_t n = read(master, buf, sizeof buf);
      /* EIO: every slave descriptor is closed, the shell (and what it started) has gone. */
      if (n <= 0 && !(n < 0 && errno == EINTR)) break;
      if (n > 0 && write_all(1, buf, (size_t)n) < 0) break;
    }
    if (fds[0].revents & (POLLIN | POLLHUP | POLLERR)) {
      ssize_t n = read(0, buf, sizeof buf);
      if (n > 0) {
        if (write_all(master, buf, (size_t)n) < 0) break;
      } else if (!(n < 0 && errno == EINTR)) {
        /* stdin closed: nothing more to type; the shell runs on until it exits or is killed. */
        fds[0].fd = -1;
      }
    }
  }
  close(master);
  int status = 0;
  while (waitpid(child, &status, 0) < 0 && errno == EINTR) {}
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + (WIFSIGNALED(status) ? WTERMSIG(status) : 0);
}

int main(int argc, char **argv) {
  if (argc == 2 && strcmp(argv[1], "reseed") == 0) return reseed();
  if (argc == 3 && strcmp(argv[1], "settime") == 0) return settime(argv[2]);
  if (argc == 2 && strcmp(argv[1], "serve") == 0) return serve();
  if (argc == 4 && strcmp(argv[1], "fasync") == 0) return set_fasync(argv[2], argv[3]);
  if (argc == 5 && strcmp(argv[1], "gate") == 0) return gate(argv[2], argv[3], argv[4]);
  if (argc >= 5 && strcmp(argv[1], "pty") == 0) return pty_run(argc, argv);
  fprintf(stderr, "usage: forkd-guestctl reseed < entropy | settime MS | serve | fasync FD PID | gate VERSION RUNTIMES STARTED_MS | pty ROWS COLS PROG [ARG...]\n");
  return 2;
}
