/*
 * forkd-guestctl: the two guest operations Node cannot do without ioctl/clock_settime.
 *   forkd-guestctl reseed   < entropy   mix stdin into the pool, credit it, reseed the CRNG
 *   forkd-guestctl settime MS            set CLOCK_REALTIME to MS milliseconds since the epoch
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

static int reseed(void) {
  struct {
    struct rand_pool_info info;
    unsigned char buf[512];
  } req;
  ssize_t n = read(0, req.buf, sizeof req.buf);
  if (n < 16) {
    fprintf(stderr, "forkd-guestctl: need at least 16 bytes of entropy on stdin\n");
    return 2;
  }
  int fd = open("/dev/random", O_WRONLY | O_CLOEXEC);
  if (fd < 0) { perror("open /dev/random"); return 1; }
  req.info.entropy_count = (int)n * 8;
  req.info.buf_size = (int)n;
  if (ioctl(fd, RNDADDENTROPY, &req.info) < 0) { perror("RNDADDENTROPY"); return 1; }
  if (ioctl(fd, RNDRESEEDCRNG) < 0) { perror("RNDRESEEDCRNG"); return 1; }
  close(fd);
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

int main(int argc, char **argv) {
  if (argc == 2 && strcmp(argv[1], "reseed") == 0) return reseed();
  if (argc == 3 && strcmp(argv[1], "settime") == 0) return settime(argv[2]);
  fprintf(stderr, "usage: forkd-guestctl reseed < entropy | forkd-guestctl settime MS\n");
  return 2;
}
