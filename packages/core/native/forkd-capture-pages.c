// forkd-capture-pages: the memory half of a live fork-to-many. A child's RAM is a
// private (copy-on-write) mapping of its snapshot's staged memory image, so the
// only guest pages that differ from that image are the ones the kernel copied on
// write: /proc/PID/pagemap shows them as anonymous. While forkd holds the VMM
// stopped, this copies exactly those pages (process_vm_readv, no ptrace stop);
// once the VMM runs again it writes them as a RAM section of a device-state
// stream, so new children map the same staged image and load only these pages.
//
//   forkd-capture-pages --pid PID --start HEXADDR --pages N --block NAME --section ID
//                       --prefix FILE --vmstate OUT --layer OUT --pagemap OUT
//
// --start/--pages: the guest RAM mapping in the VMM (from /proc/PID/maps).
// --block/--section: the RAM block's name and the "ram" section's id in the stream.
// --prefix: a device-state stream of the same machine; its first PREFIXLEN bytes
//   (header, configuration, RAM setup) start the output.
// One line each way on stdin/stdout:
//   -> ready                     pagemap opened
//   <- go                        the VMM is stopped
//   -> captured PAGES            pages copied: the VMM may run again
//   <- devices FILE PREFIXLEN    QEMU's device state (xen-save-devices-state)
//   -> done BYTES                OUT files written (BYTES: the stream)
// Any failure: "error MESSAGE" on stdout and exit status 1.
// --layer/--pagemap: the same pages in store/layers.ts format (pages back to back,
// one bit per page), from which the durable snapshot is assembled later.
// --method: how the written pages are found: scan (PAGEMAP_SCAN), read (every
// pagemap entry) or auto (default: scan where the kernel has it). Tests compare them.
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#define PAGE 4096ULL
#define PM_PRESENT (1ULL << 63)
#define PM_SWAPPED (1ULL << 62)
#define PM_FILE (1ULL << 61)
// QEMU's RAM stream flags (migration/ram.c) and section markers (migration/savevm.h).
#define RAM_ZERO 0x02ULL
#define RAM_PAGE 0x08ULL
#define RAM_EOS 0x10ULL
#define RAM_CONTINUE 0x20ULL
#define SECTION_PART 0x02
#define SECTION_FOOTER 0x7e
#define VM_MAGIC 0x5145564dU
#define VM_VERSION 3U
#define BATCH_IOVS 1024
// PAGEMAP_SCAN (Linux 6.7, include/uapi/linux/fs.h), spelled out: Debian 12's headers predate it.
#define PAGE_IS_FILE (1ULL << 2)
#define PAGE_IS_PRESENT (1ULL << 3)
#define PAGE_IS_SWAPPED (1ULL << 4)
struct page_region {
  uint64_t start, end, categories;
};
struct pm_scan_arg {
  uint64_t size, flags, start, end, walk_end, vec, vec_len, max_pages;
  uint64_t category_inverted, category_mask, category_anyof_mask, return_mask;
};
#define PAGEMAP_SCAN _IOWR('f', 16, struct pm_scan_arg)
#define SCAN_REGIONS 1024

static _Noreturn void fail(const char *what) {
  printf("error %s: %s\n", what, strerror(errno));
  fflush(stdout);
  exit(1);
}

static _Noreturn void failmsg(const char *msg) {
  printf("error %s\n", msg);
  fflush(stdout);
  exit(1);
}

static unsigned long long parse_num(const char *s, int base, const char *what) {
  char *end;
  errno = 0;
  unsigned long long v = strtoull(s, &end, base);
  if (errno || *end || end == s) failmsg(what);
  return v;
}

static void read_line(char *buf, size_t size) {
  if (!fgets(buf, (int)size, stdin)) failmsg("stdin closed");
  buf[strcspn(buf, "\n")] = 0;
}

static void pread_all(int fd, void *buf, size_t len, off_t off, const char *what) {
  size_t done = 0;
  while (done < len) {
    ssize_t n = pread(fd, (char *)buf + done, len - done, off + (off_t)done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) fail(what);
    done += (size_t)n;
  }
}

static unsigned char *read_file(const char *path, size_t *size) {
  int fd = open(path, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
  if (fd < 0) fail(path);
  struct stat st;
  if (fstat(fd, &st) < 0) fail(path);
  unsigned char *buf = malloc(st.st_size ? (size_t)st.st_size : 1);
  if (!buf) fail("malloc");
  pread_all(fd, buf, (size_t)st.st_size, 0, path);
  close(fd);
  *size = (size_t)st.st_size;
  return buf;
}

// A buffered writer: the stream is written in large pieces, never byte by byte.
typedef struct {
  int fd;
  unsigned char buf[1 << 20];
  size_t used;
  unsigned long long total;
  const char *path;
} Out;

static void out_open(Out *o, const char *path) {
  o->fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
  if (o->fd < 0) fail(path);
  o->used = 0;
  o->total = 0;
  o->path = path;
}

static void out_flush(Out *o) {
  size_t done = 0;
  while (done < o->used) {
    ssize_t n = write(o->fd, o->buf + done, o->used - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) fail(o->path);
    done += (size_t)n;
  }
  o->used = 0;
}

static void out_put(Out *o, const void *data, size_t len) {
  const unsigned char *p = data;
  o->total += len;
  while (len > 0) {
    if (o->used == sizeof o->buf) out_flush(o);
    size_t take = sizeof o->buf - o->used < len ? sizeof o->buf - o->used : len;
    memcpy(o->buf + o->used, p, take);
    o->used += take;
    p += take;
    len -= take;
  }
}

static void out_be64(Out *o, unsigned long long v) {
  unsigned char b[8];
  for (int i = 0; i < 8; i++) b[i] = (unsigned char)(v >> (56 - 8 * i));
  out_put(o, b, 8);
}

static void out_be32(Out *o, unsigned int v) {
  unsigned char b[4] = {(unsigned char)(v >> 24), (unsigned char)(v >> 16), (unsigned char)(v >> 8), (unsigned char)v};
  out_put(o, b, 4);
}

static void out_close(Out *o) {
  out_flush(o);
  if (close(o->fd) < 0) fail(o->path);
}

static int is_zero(const unsigned char *p) {
  for (size_t i = 0; i < PAGE; i++)
    if (p[i]) return 0;
  return 1;
}

static void mark(uint8_t *bitmap, unsigned long long p) { bitmap[p >> 3] |= (uint8_t)(1U << (p & 7)); }

// The written pages by PAGEMAP_SCAN: the kernel walks only the page tables that
// exist and returns runs of pages that are present or swapped and not file-backed
// (private anonymous copies). Its cost follows what the guest touched, not its RAM
// size (2 GiB guest here: ~1 ms, against ~60 ms reading all 512 Ki pagemap
// entries). Returns 0 where the kernel has no PAGEMAP_SCAN; the pagemap is read then.
static int scan_written(int pm_fd, unsigned long long start, unsigned long long pages, uint8_t *bitmap,
                        unsigned long long *count) {
  static struct page_region regions[SCAN_REGIONS];
  const unsigned long long end = start + pages * PAGE;
  unsigned long long at = start;
  while (at < end) {
    struct pm_scan_arg arg = {
        .size = sizeof arg,
        .start = at,
        .end = end,
        .vec = (uint64_t)(uintptr_t)regions,
        .vec_len = SCAN_REGIONS,
        .category_inverted = PAGE_IS_FILE,
        .category_mask = PAGE_IS_FILE,
        .category_anyof_mask = PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
        .return_mask = PAGE_IS_PRESENT | PAGE_IS_SWAPPED | PAGE_IS_FILE,
    };
    int n = ioctl(pm_fd, PAGEMAP_SCAN, &arg);
    if (n < 0 && at == start && (errno == ENOTTY || errno == EINVAL)) return 0;
    if (n < 0) fail("PAGEMAP_SCAN");
    for (int i = 0; i < n; i++) {
      if (regions[i].start < at || regions[i].end > end || regions[i].start >= regions[i].end || regions[i].start % PAGE ||
          regions[i].end % PAGE)
        failmsg("PAGEMAP_SCAN returned a region outside the guest RAM");
      // Counted once: when the region array fills, the next call may report the tail of the last region again.
      for (unsigned long long a = regions[i].start; a < regions[i].end; a += PAGE) {
        unsigned long long p = (a - start) / PAGE;
        if (bitmap[p >> 3] & (1U << (p & 7))) continue;
        mark(bitmap, p);
        (*count)++;
      }
    }
    if (arg.walk_end <= at || arg.walk_end > end) failmsg("PAGEMAP_SCAN made no progress");
    at = arg.walk_end;
  }
  return 1;
}

int main(int argc, char **argv) {
  long pid = 0;
  unsigned long long start = 0, pages = 0, section = 0;
  const char *block = NULL, *prefix = NULL, *vmstate = NULL, *layer = NULL, *pagemap = NULL, *method = "auto";
  for (int i = 1; i + 1 < argc; i += 2) {
    const char *k = argv[i], *v = argv[i + 1];
    if (!strcmp(k, "--pid")) pid = (long)parse_num(v, 10, "--pid");
    else if (!strcmp(k, "--start")) start = parse_num(v, 16, "--start");
    else if (!strcmp(k, "--pages")) pages = parse_num(v, 10, "--pages");
    else if (!strcmp(k, "--section")) section = parse_num(v, 10, "--section");
    else if (!strcmp(k, "--block")) block = v;
    else if (!strcmp(k, "--prefix")) prefix = v;
    else if (!strcmp(k, "--vmstate")) vmstate = v;
    else if (!strcmp(k, "--layer")) layer = v;
    else if (!strcmp(k, "--pagemap")) pagemap = v;
    else if (!strcmp(k, "--method")) method = v;
    else failmsg("unknown argument");
  }
  if (pid <= 0 || !start || start % PAGE || !pages || pages > (1ULL << 28) || section > 0xffffffffULL || !block ||
      strlen(block) > 255 || !prefix || !vmstate || !layer || !pagemap ||
      (strcmp(method, "auto") && strcmp(method, "scan") && strcmp(method, "read")))
    failmsg("usage: --pid --start --pages --block --section --prefix --vmstate --layer --pagemap [--method auto|scan|read]");

  char path[64];
  snprintf(path, sizeof path, "/proc/%ld/pagemap", pid);
  int pm_fd = open(path, O_RDONLY | O_CLOEXEC);
  if (pm_fd < 0) fail(path);
  uint64_t *entries = malloc(pages * sizeof *entries);
  uint8_t *bitmap = calloc((pages + 7) / 8, 1);
  if (!entries || !bitmap) fail("malloc");
  printf("ready\n");
  fflush(stdout);

  char line[PATH_MAX + 64];
  read_line(line, sizeof line);
  if (strcmp(line, "go")) failmsg("expected go");
  unsigned long long count = 0;
  int scanned = strcmp(method, "read") ? scan_written(pm_fd, start, pages, bitmap, &count) : 0;
  if (!scanned && !strcmp(method, "scan")) failmsg("this kernel has no PAGEMAP_SCAN");
  if (!scanned) {
    pread_all(pm_fd, entries, pages * sizeof *entries, (off_t)(start / PAGE * sizeof *entries), path);
    for (unsigned long long p = 0; p < pages; p++) {
      uint64_t e = entries[p];
      // Written since the restore: a private anonymous copy (present, not file-backed), or swapped out.
      if ((e & PM_SWAPPED) || ((e & PM_PRESENT) && !(e & PM_FILE))) {
        mark(bitmap, p);
        count++;
      }
    }
  }
  unsigned char *data = count ? malloc(count * PAGE) : NULL;
  if (count && !data) fail("malloc");
  // Runs of written pages, up to BATCH_IOVS a call, straight into one buffer.
  struct iovec remote[BATCH_IOVS];
  unsigned long long p = 0, copied = 0;
  while (p < pages) {
    int nr = 0;
    size_t batch = 0;
    while (p < pages && nr < BATCH_IOVS) {
      if (!(bitmap[p >> 3] & (1U << (p & 7)))) {
        p++;
        continue;
      }
      unsigned long long run = 1;
      while (p + run < pages && (bitmap[(p + run) >> 3] & (1U << ((p + run) & 7)))) run++;
      remote[nr].iov_base = (void *)(uintptr_t)(start + p * PAGE);
      remote[nr].iov_len = run * PAGE;
      batch += run * PAGE;
      nr++;
      p += run;
    }
    if (nr == 0) break;
    struct iovec local = {.iov_base = data + copied * PAGE, .iov_len = batch};
    ssize_t got = process_vm_readv((pid_t)pid, &local, 1, remote, (unsigned long)nr, 0);
    if (got < 0) fail("process_vm_readv");
    if ((size_t)got != batch) failmsg("process_vm_readv read less than the written pages");
    copied += batch / PAGE;
  }
  printf("captured %llu\n", count);
  fflush(stdout);

  read_line(line, sizeof line);
  char devices_path[PATH_MAX];
  unsigned long long prefix_len = 0;
  {
    char *space = strrchr(line, ' ');
    if (strncmp(line, "devices ", 8) || !space || space == line + 7) failmsg("expected devices FILE PREFIXLEN");
    *space = 0;
    prefix_len = parse_num(space + 1, 10, "PREFIXLEN");
    if (strlen(line + 8) >= sizeof devices_path) failmsg("device state path too long");
    strcpy(devices_path, line + 8);
  }
  size_t prefix_size, devices_size;
  unsigned char *pre = read_file(prefix, &prefix_size);
  unsigned char *dev = read_file(devices_path, &devices_size);
  if (prefix_len < 8 || prefix_len > prefix_size) failmsg("PREFIXLEN is outside the prefix stream");
  if (devices_size < 9) failmsg("the device state is not a QEMU stream");
  unsigned int magic = (unsigned)dev[0] << 24 | (unsigned)dev[1] << 16 | (unsigned)dev[2] << 8 | dev[3];
  unsigned int version = (unsigned)dev[4] << 24 | (unsigned)dev[5] << 16 | (unsigned)dev[6] << 8 | dev[7];
  if (magic != VM_MAGIC || version != VM_VERSION) failmsg("the device state is not a QEMU stream");

  static Out vm, ly;
  out_open(&vm, vmstate);
  out_put(&vm, pre, prefix_len);
  if (count) {
    unsigned char part = SECTION_PART, footer = SECTION_FOOTER, len = (unsigned char)strlen(block);
    out_put(&vm, &part, 1);
    out_be32(&vm, (unsigned)section);
    unsigned long long i = 0;
    for (unsigned long long q = 0; q < pages; q++) {
      if (!(bitmap[q >> 3] & (1U << (q & 7)))) continue;
      const unsigned char *page = data + i * PAGE;
      int zero = is_zero(page);
      out_be64(&vm, q * PAGE | (zero ? RAM_ZERO : RAM_PAGE) | (i ? RAM_CONTINUE : 0));
      if (!i) {
        out_put(&vm, &len, 1);
        out_put(&vm, block, len);
      }
      if (zero) {
        unsigned char fill = 0;
        out_put(&vm, &fill, 1);
      } else {
        out_put(&vm, page, PAGE);
      }
      i++;
    }
    out_be64(&vm, RAM_EOS);
    out_put(&vm, &footer, 1);
    out_be32(&vm, (unsigned)section);
  }
  out_put(&vm, dev + 8, devices_size - 8);
  out_close(&vm);

  out_open(&ly, layer);
  if (count) out_put(&ly, data, count * PAGE);
  out_close(&ly);
  int map_fd = open(pagemap, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
  if (map_fd < 0) fail(pagemap);
  size_t map_len = (pages + 7) / 8, done = 0;
  while (done < map_len) {
    ssize_t n = write(map_fd, bitmap + done, map_len - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) fail(pagemap);
    done += (size_t)n;
  }
  if (close(map_fd) < 0) fail(pagemap);
  printf("done %llu\n", vm.total);
  fflush(stdout);
  return 0;
}
