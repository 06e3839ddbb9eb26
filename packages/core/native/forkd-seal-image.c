// forkd-seal-image: hold one staged memory image as a sealed memfd that no VMM can write.
//
//   forkd-seal-image SRC
//
// QEMU 7.2 opens a memory-backend-file read-write even for a private (copy-on-write)
// mapping, so a file every child maps had to be writable by every VMM: one escaped
// QEMU could rewrite the base pages of all its siblings. A memfd sealed with
// F_SEAL_WRITE|F_SEAL_SHRINK|F_SEAL_GROW|F_SEAL_SEAL can still be opened read-write
// and mapped privately (what QEMU does), but write(2), a shared writable mapping,
// truncation, fallocate and removing the seals all fail with EPERM, for every
// process, root included: the seals belong to the file, not to a descriptor.
//
// Run as root by forkd. Copies SRC (a staged image in root's staging dir) into a
// new memfd, seals it, keeps it as fd 3, writes "ready\n" to stdout and closes it,
// then holds the memfd until SRC is removed or replaced (eviction, rmi, cleanup)
// or it is killed. forkd-vmm-launch opens /proc/THIS/fd/3 for each child, so all
// children of one staged image share its pages. The pages stay as long as one
// child still maps them, whether or not this process is alive.
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/sendfile.h>
#include <sys/stat.h>
#include <unistd.h>

#define HELD_FD 3
#define ALL_SEALS (F_SEAL_WRITE | F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL)

static _Noreturn void die(const char *what, const char *arg) {
  fprintf(stderr, "forkd-seal-image: %s%s%s: %s\n", what, arg ? " " : "", arg ? arg : "", strerror(errno));
  _exit(1);
}

int main(int argc, char **argv) {
  if (argc != 2 || argv[1][0] != '/') {
    fprintf(stderr, "usage: forkd-seal-image /ABSOLUTE/PATH/memory.bin\n");
    return 2;
  }
  const char *src_path = argv[1];
  // The source lies in root's own staging dir; a symlink there is not ours to follow.
  int src = open(src_path, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
  if (src < 0) die("open", src_path);
  struct stat src_st;
  if (fstat(src, &src_st)) die("stat", src_path);
  if (!S_ISREG(src_st.st_mode)) {
    errno = EINVAL;
    die("not a regular file", src_path);
  }
  // Named after the staged dir (its stage key, TAG@DIGEST): a live capture reads the
  // name in the VMM's /proc/PID/maps to know which snapshot's image it maps.
  char name[200] = "forkd-staged-image:";
  const char *slash = strrchr(src_path, '/');
  const char *dir_start = slash;
  while (dir_start > src_path && dir_start[-1] != '/') dir_start--;
  size_t key_len = (size_t)(slash - dir_start);
  size_t used = strlen(name);
  if (key_len == 0 || key_len >= sizeof name - used) {
    errno = ENAMETOOLONG;
    die("staged dir name", src_path);
  }
  for (size_t k = 0; k < key_len; k++) {
    char c = dir_start[k];
    int ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '@' || c == '.' || c == '_' || c == '-';
    if (!ok) {
      errno = EINVAL;
      die("staged dir name", src_path);
    }
  }
  memcpy(name + used, dir_start, key_len);
  name[used + key_len] = 0;
  int mem = memfd_create(name, MFD_ALLOW_SEALING | MFD_CLOEXEC);
  if (mem < 0) die("memfd_create", NULL);
  if (ftruncate(mem, src_st.st_size)) die("size the memfd", NULL);
  off_t offset = 0;
  while (offset < src_st.st_size) {
    ssize_t n = sendfile(mem, src, &offset, (size_t)(src_st.st_size - offset));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) die("copy", src_path);
    if (n == 0) {
      errno = EIO;
      die("source shrank while copied", src_path);
    }
  }
  close(src);
  // rw for everyone: QEMU reopens it through /proc/self/fd as its own uid, O_RDWR.
  // Only processes holding a descriptor reach it, and the seals keep it unwritable.
  if (fchmod(mem, 0666)) die("chmod the memfd", NULL);
  if (fcntl(mem, F_ADD_SEALS, ALL_SEALS)) die("seal", NULL);
  if (fcntl(mem, F_GET_SEALS) != ALL_SEALS) {
    errno = EPERM;
    die("seals not in force", NULL);
  }
  if (mem != HELD_FD) {
    if (dup2(mem, HELD_FD) < 0) die("dup2", NULL);
    close(mem);
  }
  // Detach from forkd's session: the image outlives the process that staged it.
  setsid();
  prctl(PR_SET_NAME, "forkd-sealed", 0, 0, 0);
  signal(SIGHUP, SIG_IGN);
  signal(SIGPIPE, SIG_IGN);
  if (write(1, "ready\n", 6) != 6) die("write ready", NULL);
  int null_fd = open("/dev/null", O_RDWR | O_CLOEXEC);
  if (null_fd >= 0) {
    dup2(null_fd, 0);
    dup2(null_fd, 1);
    dup2(null_fd, 2);
    close(null_fd);
  }
  if (chdir("/")) _exit(1);
  // Hold the memfd while the staged file it copies is there: forkd evicts or
  // removes a staged image by removing its file, and a test's temporary staging
  // dir vanishing ends this process too, instead of pinning its memory.
  for (;;) {
    sleep(1);
    struct stat now;
    if (lstat(src_path, &now) || now.st_ino != src_st.st_ino || now.st_dev != src_st.st_dev) _exit(0);
  }
}
