// forkd-vmm-launch: start one VMM confined. Run as root by forkd; execs the VMM as
// an unprivileged uid with no capabilities, no_new_privs, optionally inside a
// network namespace, and in a private mount view where forkd's state, the other
// VMs' runtime dirs and the host's secrets do not exist.
//
//   forkd-vmm-launch [--uid N --gid G] [--groups G1,G2] [--netns PATH]
//                    [--hide PATH]... [--expose PATH]... [--parent-pid PID] [--die-with-parent]
//                    [--listen-unix PATH [--socket-owner UID:GID]] [--memfd PATH] -- VMM ARGS...
//
// --unshare-net: a new, empty network namespace (its loopback down, no other link):
//   for a VMM that needs no network (a BRANCH materialiser, a VM without a NIC or
//   with an isolated one), so an escaped QEMU reaches neither the host's loopback
//   nor its networks. Not with --netns.
// --memfd PATH: open PATH (/proc/HOLDER/fd/3 of a forkd-seal-image) as root, refuse it
//   unless it is a memfd carrying every seal (write, shrink, grow, seal), and hand it
//   to the VMM as fd 100 (QEMU's mem-path=/proc/self/fd/100): the staged image the
//   VMM maps copy-on-write, which neither it nor anyone else can write.
//
// --listen-unix PATH: (for a migration stream copier) listen on a unix socket at
//   PATH (0600, created as --socket-owner, never chowned), write "ready\n" to stderr, accept one
//   connection, remove PATH, and run the command with that connection as stdin.
//   The socket belongs to this process from the start, so a forkd that dies after
//   pointing a VMM at it leaves a copier to take the stream, never a dead listener.
//
// --hide PATH: a directory is covered by an empty read-only tmpfs, a file by /dev/null.
// --expose PATH: brought back (same path, read-write as its own permissions allow)
//   after the hiding, for what the VMM needs: its runtime dir, its image, its memory file.
// --parent-pid PID: the process that must be this one's parent for --die-with-parent
//   (forkd's own pid): a parent that died before this process first ran cannot be
//   told from the reaper that adopted it any other way.
// Arguments come from forkd, never from a shell; paths must be absolute.
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <linux/capability.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/fsuid.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <unistd.h>

#define MAX_PATHS 64
#define MEMFD_TARGET_FD 100
#define ALL_SEALS (F_SEAL_WRITE | F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL)
#define MAX_GROUPS 16

static _Noreturn void die(const char *what, const char *arg) {
  fprintf(stderr, "forkd-vmm-launch: %s%s%s: %s\n", what, arg ? " " : "", arg ? arg : "", strerror(errno));
  _exit(126);
}

static _Noreturn void usage(const char *msg) {
  fprintf(stderr, "forkd-vmm-launch: %s\n", msg);
  _exit(125);
}

static unsigned long parse_id(const char *s, const char *what) {
  char *end;
  errno = 0;
  unsigned long v = strtoul(s, &end, 10);
  if (errno || *end || end == s || v == 0 || v >= 4294967295UL) usage(what);
  return v;
}

// Filesystems this launcher mounted in its private view (the hiding and covering
// tmpfs): the only places it may create a mount point. Everything else is the
// host's, and the mount namespace does not shield an inode's mode or content, so
// no directory or file outside these is ever created, chmod'ed or chown'ed here.
#define MAX_OWN_MOUNTS (2 * MAX_PATHS)
static dev_t own_devs[MAX_OWN_MOUNTS];
static char *own_paths[MAX_OWN_MOUNTS];
static int n_own_devs;

static int is_own_mount(dev_t dev) {
  for (int k = 0; k < n_own_devs; k++)
    if (own_devs[k] == dev) return 1;
  return 0;
}

static void mount_own_tmpfs(const char *path, const char *why) {
  if (n_own_devs == MAX_OWN_MOUNTS) usage("too many directories to hide or cover");
  if (mount("forkd-hidden", path, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=64k,mode=0755")) die(why, path);
  struct stat st;
  if (stat(path, &st)) die("stat", path);
  own_paths[n_own_devs] = strdup(path);
  if (!own_paths[n_own_devs]) die("strdup", path);
  own_devs[n_own_devs++] = st.st_dev;
}

// Whether the VMM's identity (uid, gid, extra groups) may search a directory, by
// its mode bits as the kernel checks them for a process without capabilities.
static int vmm_can_search(const struct stat *st, uid_t uid, gid_t gid, const gid_t *groups, int ngroups) {
  if (st->st_uid == uid) return (st->st_mode & S_IXUSR) != 0;
  int in_group = st->st_gid == gid;
  for (int k = 0; k < ngroups && !in_group; k++) in_group = st->st_gid == groups[k];
  if (in_group) return (st->st_mode & S_IXGRP) != 0;
  return (st->st_mode & S_IXOTH) != 0;
}

// An exposed path may lie below a directory the VMM cannot search (a private
// 0700 parent, a test's mkdtemp root). Rather than loosen that directory, cover
// the highest such one with a tmpfs of our own in this private view: the VMM sees
// none of its other entries, and the exposed path is bind-mounted back inside.
static void cover_unsearchable_ancestor(const char *path, uid_t uid, gid_t gid, const gid_t *groups, int ngroups) {
  char buf[4096];
  if (strlen(path) >= sizeof buf) usage("path too long");
  strcpy(buf, path);
  for (char *p = buf + 1; *p; p++) {
    if (*p != '/') continue;
    *p = 0;
    struct stat st;
    if (stat(buf, &st)) {
      if (errno == ENOENT) return; // inside a tmpfs of ours: made searchable when created
      die("stat", buf);
    }
    if (!S_ISDIR(st.st_mode)) {
      errno = ENOTDIR;
      die("exposed path's parent", buf);
    }
    if (!is_own_mount(st.st_dev) && !vmm_can_search(&st, uid, gid, groups, ngroups)) {
      mount_own_tmpfs(buf, "cover unsearchable directory");
      return; // what lies below no longer exists in this view
    }
    *p = '/';
  }
}

// Create one missing mount point, only inside a tmpfs of ours.
static void create_mount_point(char *buf, int is_dir) {
  char *slash = strrchr(buf, '/');
  struct stat parent;
  if (slash == buf) {
    if (stat("/", &parent)) die("stat", "/");
  } else {
    *slash = 0;
    if (stat(buf, &parent)) die("stat", buf);
    *slash = '/';
  }
  if (!is_own_mount(parent.st_dev)) {
    errno = EPERM;
    die("refusing to create a mount point on the host's filesystem", buf);
  }
  if (is_dir) {
    if (mkdir(buf, 0755) && errno != EEXIST) die("mkdir", buf);
  } else {
    int fd = open(buf, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0644);
    if (fd < 0 && errno != EEXIST) die("create mount point", buf);
    if (fd >= 0) close(fd);
  }
}

// mkdir -p of a mount point for an exposed path: what exists is left as it is,
// what is missing is created (0755, so the VMM can reach the mount) in our tmpfs.
static void make_path(const char *path, int is_dir) {
  char buf[4096];
  if (strlen(path) >= sizeof buf) usage("path too long");
  strcpy(buf, path);
  struct stat st;
  for (char *p = buf + 1; *p; p++) {
    if (*p != '/') continue;
    *p = 0;
    if (stat(buf, &st)) {
      if (errno != ENOENT) die("stat", buf);
      create_mount_point(buf, 1);
    }
    *p = '/';
  }
  if (stat(buf, &st)) {
    if (errno != ENOENT) die("stat", buf);
    create_mount_point(buf, is_dir);
  }
}

int main(int argc, char **argv) {
  uid_t uid = 0;
  gid_t gid = 0;
  gid_t groups[MAX_GROUPS];
  int ngroups = 0;
  const char *netns = NULL;
  const char *hide[MAX_PATHS];
  const char *expose[MAX_PATHS];
  int nhide = 0, nexpose = 0, die_with_parent = 0;
  const char *listen_path = NULL;
  const char *memfd_path = NULL;
  int unshare_net = 0;
  pid_t expected_parent = 0;
  uid_t sock_uid = (uid_t)-1;
  gid_t sock_gid = (gid_t)-1;
  int i = 1;
  for (; i < argc; i++) {
    const char *a = argv[i];
    if (!strcmp(a, "--")) {
      i++;
      break;
    }
    if (!strcmp(a, "--unshare-net")) {
      unshare_net = 1;
      continue;
    }
    if (i + 1 >= argc && strcmp(a, "--die-with-parent")) usage("option without a value");
    if (!strcmp(a, "--uid")) uid = (uid_t)parse_id(argv[++i], "--uid must be a whole number above 0");
    else if (!strcmp(a, "--gid")) gid = (gid_t)parse_id(argv[++i], "--gid must be a whole number above 0");
    else if (!strcmp(a, "--groups")) {
      char *list = argv[++i];
      char *rest;
      for (char *tok = strtok_r(list, ",", &rest); tok; tok = strtok_r(NULL, ",", &rest)) {
        if (ngroups == MAX_GROUPS) usage("too many --groups");
        groups[ngroups++] = (gid_t)parse_id(tok, "--groups takes whole numbers");
      }
    } else if (!strcmp(a, "--netns")) netns = argv[++i];
    else if (!strcmp(a, "--hide")) {
      if (nhide == MAX_PATHS) usage("too many --hide");
      hide[nhide++] = argv[++i];
    } else if (!strcmp(a, "--expose")) {
      if (nexpose == MAX_PATHS) usage("too many --expose");
      expose[nexpose++] = argv[++i];
    } else if (!strcmp(a, "--listen-unix")) listen_path = argv[++i];
    else if (!strcmp(a, "--memfd")) memfd_path = argv[++i];
    else if (!strcmp(a, "--parent-pid")) expected_parent = (pid_t)parse_id(argv[++i], "--parent-pid must be a whole number above 0");
    else if (!strcmp(a, "--socket-owner")) {
      char *owner = argv[++i];
      char *colon = strchr(owner, ':');
      if (!colon) usage("--socket-owner wants UID:GID");
      *colon = 0;
      sock_uid = (uid_t)parse_id(owner, "--socket-owner wants UID:GID");
      sock_gid = (gid_t)parse_id(colon + 1, "--socket-owner wants UID:GID");
    } else if (!strcmp(a, "--die-with-parent")) die_with_parent = 1;
    else usage("unknown option");
  }
  if (i >= argc) usage("no VMM command after --");
  if (!uid != !gid) usage("--uid and --gid go together");
  for (int k = 0; k < nhide; k++)
    if (hide[k][0] != '/') usage("--hide paths must be absolute");
  for (int k = 0; k < nexpose; k++)
    if (expose[k][0] != '/') usage("--expose paths must be absolute");
  if (listen_path && listen_path[0] != '/') usage("--listen-unix path must be absolute");
  if (memfd_path && memfd_path[0] != '/') usage("--memfd path must be absolute");
  pid_t parent = expected_parent ? expected_parent : getppid();
  // Early too (it is set again after the credentials change, which clears it): the
  // copier must not outlive its parent while it waits for the VMM to connect.
  if (die_with_parent) {
    if (prctl(PR_SET_PDEATHSIG, SIGKILL)) die("parent-death signal", NULL);
    if (getppid() != parent) _exit(1);
  }
  if (listen_path) {
    // The socket goes in the VMM's own runtime dir, which that VMM's uid can change:
    // root never resolves a name there after its parent dir is opened, and never
    // chowns by path. The socket is bound relative to that dir with the owner's
    // filesystem ids, so it is born theirs (0600 by the umask): nothing to chown, and
    // no window in which a name swapped for a symlink gets a host file chowned.
    const char *slash = strrchr(listen_path, '/');
    const char *name = slash + 1;
    struct sockaddr_un addr;
    memset(&addr, 0, sizeof addr);
    addr.sun_family = AF_UNIX;
    if (!*name || strlen(name) >= sizeof addr.sun_path) usage("--listen-unix wants a short file name in a directory");
    strcpy(addr.sun_path, name);
    char dir_path[4096];
    size_t dir_len = slash == listen_path ? 1 : (size_t)(slash - listen_path);
    if (dir_len >= sizeof dir_path) usage("--listen-unix path too long");
    memcpy(dir_path, listen_path, dir_len);
    dir_path[dir_len] = 0;
    int dir = open(dir_path, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (dir < 0) die("open socket dir", dir_path);
    if (fchdir(dir)) die("enter socket dir", dir_path);
    int listener = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (listener < 0) die("socket", NULL);
    mode_t old = umask(0177);
    if (sock_uid != (uid_t)-1) {
      setfsgid(sock_gid);
      setfsuid(sock_uid);
      if ((uid_t)setfsuid((uid_t)-1) != sock_uid || (gid_t)setfsgid((gid_t)-1) != sock_gid) {
        errno = EPERM;
        die("take the socket owner's filesystem ids", NULL);
      }
    }
    int bound = bind(listener, (struct sockaddr *)&addr, sizeof addr);
    int bind_errno = errno;
    if (sock_uid != (uid_t)-1) {
      setfsuid(0);
      setfsgid(0);
      if (setfsuid((uid_t)-1) != 0) _exit(126);
    }
    errno = bind_errno;
    if (bound) die("bind", listen_path);
    umask(old);
    if (listen(listener, 1)) die("listen", listen_path);
    if (write(2, "ready\n", 6) != 6) die("write ready", NULL);
    int conn = accept4(listener, NULL, NULL, SOCK_CLOEXEC);
    if (conn < 0) die("accept", listen_path);
    close(listener);
    unlinkat(dir, name, 0);
    close(dir);
    if (chdir("/")) die("chdir", "/");
    if (dup2(conn, 0) < 0) die("dup2", NULL);
    close(conn);
  }

  if (memfd_path) {
    // Opened as root (the holder's /proc/PID/fd is root's), checked, then inherited.
    int fd = open(memfd_path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) die("open staged image", memfd_path);
    int seals = fcntl(fd, F_GET_SEALS);
    if (seals < 0) die("staged image is not a sealable memfd", memfd_path);
    if ((seals & ALL_SEALS) != ALL_SEALS) {
      errno = EPERM;
      die("staged image is not sealed against writes", memfd_path);
    }
    if (fd == MEMFD_TARGET_FD) {
      if (fcntl(fd, F_SETFD, 0)) die("inherit staged image", NULL);
    } else {
      if (dup2(fd, MEMFD_TARGET_FD) < 0) die("dup2 staged image", NULL);
      close(fd);
    }
  }

  if (unshare_net && netns) usage("--unshare-net and --netns exclude each other");
  if (unshare_net && unshare(CLONE_NEWNET)) die("unshare network namespace", NULL);
  if (netns) {
    int fd = open(netns, O_RDONLY | O_CLOEXEC);
    if (fd < 0) die("open network namespace", netns);
    if (setns(fd, CLONE_NEWNET)) die("enter network namespace", netns);
    close(fd);
  }

  if ((nhide || nexpose) && unshare(CLONE_NEWNS)) die("unshare mount namespace", NULL);
  if ((nhide || nexpose) && mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL)) die("make mounts private", NULL);

  // Keep a handle on each exposed path before anything above it is hidden.
  int expose_fd[MAX_PATHS];
  int expose_dir[MAX_PATHS];
  for (int k = 0; k < nexpose; k++) {
    expose_fd[k] = open(expose[k], O_PATH | O_CLOEXEC);
    if (expose_fd[k] < 0) die("open exposed path", expose[k]);
    struct stat st;
    if (fstat(expose_fd[k], &st)) die("stat exposed path", expose[k]);
    expose_dir[k] = S_ISDIR(st.st_mode);
  }
  for (int k = 0; k < nhide; k++) {
    struct stat st;
    if (stat(hide[k], &st)) {
      if (errno == ENOENT) continue;
      die("stat hidden path", hide[k]);
    }
    if (S_ISDIR(st.st_mode)) {
      mount_own_tmpfs(hide[k], "hide");
    } else {
      if (mount("/dev/null", hide[k], NULL, MS_BIND, NULL)) die("hide", hide[k]);
    }
  }
  // Covers first, all of them, so that no cover is laid over a bind made for an earlier path.
  if (uid) {
    for (int k = 0; k < nexpose; k++) cover_unsearchable_ancestor(expose[k], uid, gid, groups, ngroups);
  }
  // The VMM inherits forkd's umask 077; the mount points we create must be searchable.
  mode_t spawn_umask = umask(022);
  for (int k = 0; k < nexpose; k++) {
    char source[64];
    snprintf(source, sizeof source, "/proc/self/fd/%d", expose_fd[k]);
    make_path(expose[k], expose_dir[k]);
    if (mount(source, expose[k], NULL, MS_BIND | MS_REC, NULL)) die("expose", expose[k]);
    close(expose_fd[k]);
  }
  umask(spawn_umask);
  // Our tmpfs mounts become read-only now that their mount points exist. Only where
  // the path still leads to the very tmpfs we mounted (a later cover may have laid
  // over it): a remount reaching any other filesystem would change the host's.
  for (int k = 0; k < n_own_devs; k++) {
    struct stat st;
    if (stat(own_paths[k], &st) == 0 && st.st_dev == own_devs[k])
      mount(NULL, own_paths[k], NULL, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=64k,mode=0755");
  }

  // Without --uid (confinement turned off) only the parent-death signal applies.
  if (uid) {
    // Drop every capability from the bounding set while we still may, then the ids.
    for (int cap = 0; cap <= 63; cap++) {
      if (prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) && errno != EINVAL) die("drop capability", NULL);
    }
    if (setgroups((size_t)ngroups, ngroups ? groups : NULL)) die("setgroups", NULL);
    if (setresgid(gid, gid, gid)) die("setresgid", NULL);
    if (setresuid(uid, uid, uid)) die("setresuid", NULL);
    struct __user_cap_header_struct header = {_LINUX_CAPABILITY_VERSION_3, 0};
    struct __user_cap_data_struct data[2];
    memset(data, 0, sizeof data);
    if (syscall(SYS_capset, &header, data)) die("clear capabilities", NULL);
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)) die("no_new_privs", NULL);
  }
  // Changing credentials clears the parent-death signal, so it is set after.
  if (die_with_parent) {
    if (prctl(PR_SET_PDEATHSIG, SIGKILL)) die("parent-death signal", NULL);
    if (getppid() != parent) _exit(1);
  }
  // An empty environment: whatever the daemon holds (FORKD_TOKEN, registry and cloud
  // credentials) is none of the VMM's or the copier's business, and neither needs any.
  char *no_environment[] = {NULL};
  execve(argv[i], &argv[i], no_environment);
  die("exec", argv[i]);
  return 126;
}
