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
 * Children restored from one snapshot start with identical CRNG state; writing to
 * /dev/urandom only mixes the input pool, so without RNDRESEEDCRNG they would keep
 * producing the same bytes until the kernel's next timed reseed.
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/random.h>
#include <math.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
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
 * op). A restored child's first calls are its identity and readiness probes; the
 * gate answers those itself (hostname, CRNG reseed, clock; ping; the host's `clock`
 * after a long silence), so between QMP `cont` and the identity answer the guest
 * runs the kernel and this small program, not the JavaScript runtime, whose code
 * TCG would translate afresh in every child.
 * The first other frame goes to the agent with the port: the gate writes what it
 * read from the port to stdout ('F', a 4-byte big-endian length, the bytes), hands
 * the port's SIGIO back to the agent and waits for the next park ("P <id>" on
 * stdin, answered on the port as the park call's result). Anything the gate is not
 * sure of (a malformed frame, an identity with a field missing or unusual, a large
 * frame) goes to the agent untouched, which answers it as it always did.
 * Messages to the agent: 'S' (SIGIO routed to the agent) or 's' + reason, and 'F'.
 */
#define GATE_MAX_FRAME 8192

static const char *gate_version = "";
static const char *gate_runtimes = "";
static long long gate_started_ms = 0;
static int gate_port = 3;

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

/* Sleep until the port signals (a host connected, or data), or a minute passes. */
static void wait_for_port(const sigset_t *sigio) {
  struct timespec limit = {.tv_sec = 60, .tv_nsec = 0};
  sigtimedwait(sigio, NULL, &limit);
}

/* Read exactly len bytes: 1 done, 0 the host hung up (read returned 0), -1 an error. */
static int read_exact(int fd, unsigned char *buf, size_t len, const sigset_t *sigio) {
  size_t got = 0;
  while (got < len) {
    ssize_t n = read(fd, buf + got, len - got);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      wait_for_port(sigio);
      continue;
    }
    if (n < 0) return -1;
    if (n == 0) return 0;
    got += (size_t)n;
  }
  return 1;
}

static long long now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* --- the few JSON shapes the gate reads: a flat object of strings and numbers --- */

typedef struct { const char *p, *end; } cursor;

static void skip_ws(cursor *c) {
  while (c->p < c->end && (*c->p == ' ' || *c->p == '\t' || *c->p == '\n' || *c->p == '\r')) c->p++;
}

/* A string without escapes (the gate needs none): its bounds, or -1 to leave the frame to the agent. */
static int plain_string(cursor *c, const char **s, size_t *n) {
  if (c->p >= c->end || *c->p != '"') return -1;
  const char *start = ++c->p;
  while (c->p < c->end && *c->p != '"') {
    if (*c->p == '\\' || (unsigned char)*c->p < 0x20) return -1;
    c->p++;
  }
  if (c->p >= c->end) return -1;
  *s = start;
  *n = (size_t)(c->p - start);
  c->p++;
  return 0;
}

/* Skip any JSON value (strings with escapes, nested objects and arrays included). */
static int skip_value(cursor *c) {
  int depth = 0;
  do {
    skip_ws(c);
    if (c->p >= c->end) return -1;
    char ch = *c->p;
    if (ch == '"') {
      c->p++;
      while (c->p < c->end && *c->p != '"') c->p += (*c->p == '\\') ? 2 : 1;
      if (c->p >= c->end) return -1;
      c->p++;
    } else if (ch == '{' || ch == '[') {
      depth++;
      c->p++;
    } else if (ch == '}' || ch == ']') {
      if (depth == 0) return -1;
      depth--;
      c->p++;
    } else if (ch == ',' || ch == ':') {
      if (depth == 0) return -1;
      c->p++;
    } else {
      const char *start = c->p;
      while (c->p < c->end && strchr(",}] \t\r\n", *c->p) == NULL) c->p++;
      if (c->p == start) return -1;
    }
  } while (depth > 0);
  return 0;
}

static int number_value(cursor *c, double *out) {
  char buf[64];
  const char *start = c->p;
  while (c->p < c->end && strchr("+-0123456789.eE", *c->p) != NULL) c->p++;
  size_t n = (size_t)(c->p - start);
  if (n == 0 || n >= sizeof buf) return -1;
  memcpy(buf, start, n);
  buf[n] = '\0';
  char *end = NULL;
  errno = 0;
  double v = strtod(buf, &end);
  if (errno != 0 || *end != '\0' || !isfinite(v)) return -1;
  *out = v;
  return 0;
}

typedef struct {
  int has_id, has_hostname, has_entropy, has_clock;
  double id;
  const char *op, *hostname, *entropy;
  size_t op_n, hostname_n, entropy_n;
  double clock_ms;
} request;

/* 0: parsed (fields it has are set); -1: not for the gate. Later duplicates win, as in JSON.parse. */
static int parse_request(const unsigned char *body, size_t len, request *r) {
  memset(r, 0, sizeof *r);
  cursor c = {(const char *)body, (const char *)body + len};
  skip_ws(&c);
  if (c.p >= c.end || *c.p != '{') return -1;
  c.p++;
  skip_ws(&c);
  if (c.p < c.end && *c.p == '}') return -1;
  for (;;) {
    const char *key;
    size_t key_n;
    skip_ws(&c);
    if (plain_string(&c, &key, &key_n) < 0) return -1;
    skip_ws(&c);
    if (c.p >= c.end || *c.p != ':') return -1;
    c.p++;
    skip_ws(&c);
#define KEY(name) (key_n == sizeof(name) - 1 && memcmp(key, name, key_n) == 0)
    if (KEY("op")) {
      if (plain_string(&c, &r->op, &r->op_n) < 0) return -1;
    } else if (KEY("hostname")) {
      if (plain_string(&c, &r->hostname, &r->hostname_n) < 0) return -1;
      r->has_hostname = 1;
    } else if (KEY("entropy")) {
      if (plain_string(&c, &r->entropy, &r->entropy_n) < 0) return -1;
      r->has_entropy = 1;
    } else if (KEY("id")) {
      if (number_value(&c, &r->id) < 0) return -1;
      r->has_id = 1;
    } else if (KEY("clockMs")) {
      if (number_value(&c, &r->clock_ms) < 0) return -1;
      r->has_clock = 1;
    } else if (skip_value(&c) < 0) {
      return -1;
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

/* The agent's hostname rule: 1-63 letters, digits or '-', not starting or ending with '-'. */
static int valid_hostname(const char *s, size_t n) {
  if (n < 1 || n > 63 || s[0] == '-' || s[n - 1] == '-') return 0;
  for (size_t i = 0; i < n; i++) {
    char ch = s[i];
    if (!((ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') || ch == '-')) return 0;
  }
  return 1;
}

static void json_escape(const char *in, char *out, size_t cap) {
  size_t o = 0;
  for (const unsigned char *p = (const unsigned char *)in; *p && o + 7 < cap; p++) {
    if (*p == '"' || *p == '\\') {
      out[o++] = '\\';
      out[o++] = (char)*p;
    } else if (*p < 0x20) {
      o += (size_t)snprintf(out + o, cap - o, "\\u%04x", *p);
    } else {
      out[o++] = (char)*p;
    }
  }
  out[o] = '\0';
}

/* One answer frame on the port; a host that has gone away simply never reads it. */
static void send_frame(const char *json) {
  size_t n = strlen(json);
  unsigned char header[4] = {(unsigned char)(n >> 24), (unsigned char)(n >> 16), (unsigned char)(n >> 8), (unsigned char)n};
  char frame[4 + 1024];
  if (n > sizeof frame - 4) return;
  memcpy(frame, header, 4);
  memcpy(frame + 4, json, n);
  (void)write_all(gate_port, frame, n + 4);
}

static void send_error(long long id, const char *code, const char *message, int err) {
  char text[256], escaped[600], json[800];
  if (err) snprintf(text, sizeof text, "%s: %s", message, strerror(err));
  else snprintf(text, sizeof text, "%s", message);
  json_escape(text, escaped, sizeof escaped);
  snprintf(json, sizeof json, "{\"id\":%lld,\"kind\":\"error\",\"code\":\"%s\",\"message\":\"%s\"}", id, code, escaped);
  send_frame(json);
}

/* 1: answered here; 0: the agent's to answer. */
static int gate_answer(const unsigned char *body, size_t len) {
  request r;
  if (parse_request(body, len, &r) < 0 || !r.has_id || !r.op) return 0;
  if (r.id < 0 || r.id > 9007199254740991.0 || r.id != (double)(long long)r.id) return 0;
  long long id = (long long)r.id;
  if (r.op_n == 4 && memcmp(r.op, "ping", 4) == 0) {
    char host[256] = "", escaped[600], json[1000];
    gethostname(host, sizeof host - 1);
    json_escape(host, escaped, sizeof escaped);
    snprintf(json, sizeof json,
             "{\"id\":%lld,\"kind\":\"result\",\"value\":{\"version\":\"%s\",\"uptimeMs\":%lld,\"runtimes\":[%s],"
             "\"hostname\":\"%s\",\"inFlight\":0,\"stats\":{\"gate\":true}}}",
             id, gate_version, now_ms() - gate_started_ms, gate_runtimes, escaped);
    send_frame(json);
    return 1;
  }
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
  char json[200];
  snprintf(json, sizeof json, "{\"id\":%lld,\"kind\":\"result\",\"value\":{\"applied\":[\"hostname\",\"entropy\",\"clock\"]}}", id);
  send_frame(json);
  return 1;
}

static void to_agent(char type, const unsigned char *bytes, size_t n) {
  unsigned char header[5] = {(unsigned char)type, (unsigned char)(n >> 24), (unsigned char)(n >> 16), (unsigned char)(n >> 8),
                             (unsigned char)n};
  if (write_all(1, header, 5) < 0 || (n > 0 && write_all(1, bytes, n) < 0)) exit(0);
}

/* Read the port until a frame is the agent's; return with what was read for it. */
static size_t gate_serve(const sigset_t *sigio, unsigned char *frame) {
  for (;;) {
    int got = read_exact(gate_port, frame, 4, sigio);
    if (got < 0) {
      sleep(1);
      continue;
    }
    if (got == 0) {
      /* No host (or it left mid-frame: that frame died with it). */
      wait_for_port(sigio);
      continue;
    }
    size_t len = (size_t)frame[0] << 24 | (size_t)frame[1] << 16 | (size_t)frame[2] << 8 | frame[3];
    if (len > GATE_MAX_FRAME) return 4; /* the agent reads the rest itself */
    got = read_exact(gate_port, frame + 4, len, sigio);
    if (got <= 0) continue;
    if (!gate_answer(frame + 4, len)) return 4 + len;
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
  sigset_t sigio;
  sigemptyset(&sigio);
  sigaddset(&sigio, SIGIO);
  sigprocmask(SIG_BLOCK, &sigio, NULL);
  signal(SIGPIPE, SIG_IGN);
  int flags = fcntl(gate_port, F_GETFL);
  if (flags < 0 || fcntl(gate_port, F_SETOWN, agent) < 0 || fcntl(gate_port, F_SETFL, flags | O_ASYNC) < 0) {
    const char *why = strerror(errno);
    to_agent('s', (const unsigned char *)why, strlen(why));
  } else {
    to_agent('S', NULL, 0);
  }
  static unsigned char frame[4 + GATE_MAX_FRAME];
  char line[128];
  while (fgets(line, sizeof line, stdin)) {
    long long id = 0;
    if (line[0] != 'P' || sscanf(line + 1, " %lld", &id) != 1) continue;
    /* The port is ours: its SIGIO too, until the agent has it back. */
    fcntl(gate_port, F_SETOWN, getpid());
    char json[120];
    snprintf(json, sizeof json, "{\"id\":%lld,\"kind\":\"result\",\"value\":{\"parked\":true}}", id);
    send_frame(json);
    size_t n = gate_serve(&sigio, frame);
    fcntl(gate_port, F_SETOWN, agent);
    to_agent('F', frame, n);
  }
  return 0;
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

int main(int argc, char **argv) {
  if (argc == 2 && strcmp(argv[1], "reseed") == 0) return reseed();
  if (argc == 3 && strcmp(argv[1], "settime") == 0) return settime(argv[2]);
  if (argc == 2 && strcmp(argv[1], "serve") == 0) return serve();
  if (argc == 4 && strcmp(argv[1], "fasync") == 0) return set_fasync(argv[2], argv[3]);
  if (argc == 5 && strcmp(argv[1], "gate") == 0) return gate(argv[2], argv[3], argv[4]);
  fprintf(stderr, "usage: forkd-guestctl reseed < entropy | settime MS | serve | fasync FD PID | gate VERSION RUNTIMES STARTED_MS\n");
  return 2;
}
