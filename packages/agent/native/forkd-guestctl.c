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
 * Children restored from one snapshot start with identical CRNG state; writing to
 * /dev/urandom only mixes the input pool, so without RNDRESEEDCRNG they would keep
 * producing the same bytes until the kernel's next timed reseed.
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/random.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
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
  fprintf(stderr, "usage: forkd-guestctl reseed < entropy | settime MS | serve | fasync FD PID\n");
  return 2;
}
