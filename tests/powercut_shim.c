/*
 * powercut_shim.c: an LD_PRELOAD library that records what a power cut would leave behind.
 *
 * Built by tests/powercut.py (cc -shared -fPIC -O2 -pthread -o ... -ldl); the model and its
 * limits are described there. With POWERCUT_DIR and POWERCUT_SNAP set (both existing
 * directories), every successful fsync()/fdatasync() of
 *
 *   - a regular file directly inside POWERCUT_DIR leaves a copy of its whole content at
 *     POWERCUT_SNAP/<base name>;
 *   - POWERCUT_DIR itself leaves the names of the regular files in it, one per line, in
 *     POWERCUT_SNAP/.dirlist;
 *
 * and sync(), or syncfs() on POWERCUT_DIR's file system, does both for every file in it.
 *
 * The copy is taken before the real call (what the caller asked to make durable) and put in
 * place with rename() only once the real call returned 0: a snapshot is never half-written,
 * and a call that never returned (the process was killed inside it) or failed records
 * nothing. A process-wide mutex is held from the copy to the rename, so that two threads
 * syncing the same file cannot leave the older copy last.
 *
 * Files are read through the caller's own descriptor (pread) whenever it is readable:
 * closing another descriptor of a file would drop every POSIX lock the process holds on it,
 * SQLite's included. Every error of the shim's own is ignored (nothing is recorded), errno is
 * preserved, and with the variables unset the calls go straight to libc.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#define DIRLIST ".dirlist"
#define TMP_PREFIX ".powercut-tmp"
#define MAX_STAGED 512

typedef int (*fd_sync_fn)(int);
typedef void (*sync_fn)(void);

static fd_sync_fn real_fsync_fn;
static fd_sync_fn real_fdatasync_fn;
static fd_sync_fn real_syncfs_fn;
static sync_fn real_sync_fn;

static int enabled;
static char watch_dir[PATH_MAX];
static size_t watch_len;
static char snap_dir[PATH_MAX];
static dev_t watch_dev;

static pthread_mutex_t guard = PTHREAD_MUTEX_INITIALIZER;
static char copy_buf[1 << 16]; /* used under the guard only */

/* Names (in POWERCUT_DIR) whose staged copy waits for the real call to succeed. */
static char staged[MAX_STAGED][NAME_MAX + 1];
static int n_staged;

static void *next_symbol(const char *name) { return dlsym(RTLD_NEXT, name); }

static void resolve(void) {
    if (!real_fsync_fn) real_fsync_fn = (fd_sync_fn)next_symbol("fsync");
    if (!real_fdatasync_fn) real_fdatasync_fn = (fd_sync_fn)next_symbol("fdatasync");
    if (!real_syncfs_fn) real_syncfs_fn = (fd_sync_fn)next_symbol("syncfs");
    if (!real_sync_fn) real_sync_fn = (sync_fn)next_symbol("sync");
}

/* A forked child must not inherit the guard held by a thread it does not have. */
static void before_fork(void) { pthread_mutex_lock(&guard); }
static void after_fork(void) { pthread_mutex_unlock(&guard); }

__attribute__((constructor)) static void powercut_init(void) {
    resolve();
    const char *w = getenv("POWERCUT_DIR");
    const char *s = getenv("POWERCUT_SNAP");
    struct stat st;
    if (!w || !s || !*w || !*s) return;
    if (!realpath(w, watch_dir) || !realpath(s, snap_dir)) return;
    if (stat(watch_dir, &st) != 0 || !S_ISDIR(st.st_mode)) return;
    watch_dev = st.st_dev;
    watch_len = strlen(watch_dir);
    if (pthread_atfork(before_fork, after_fork, after_fork) != 0) return;
    enabled = 1;
}

/* snap_dir/<prefix><name> into out; 0 if it fits. */
static int snap_path(char *out, size_t size, const char *prefix, const char *name) {
    int n = snprintf(out, size, "%s/%s%s", snap_dir, prefix, name);
    return (n < 0 || (size_t)n >= size) ? -1 : 0;
}

static int tmp_path(char *out, size_t size, const char *name) {
    char prefix[64];
    snprintf(prefix, sizeof prefix, TMP_PREFIX ".%ld.", (long)getpid());
    return snap_path(out, size, prefix, name);
}

static int write_all(int fd, const char *data, size_t len) {
    while (len > 0) {
        ssize_t n = write(fd, data, len);
        if (n < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        data += n;
        len -= (size_t)n;
    }
    return 0;
}

/* Whether `name` (a directory entry of POWERCUT_DIR) is recorded at all. */
static int usable_name(const char *name) {
    if (!strcmp(name, ".") || !strcmp(name, "..")) return 0;
    if (strchr(name, '\n')) return 0; /* cannot be listed one per line */
    return strlen(name) <= NAME_MAX;
}

/* Copy all of src_fd (read with pread from offset 0) to a new staged file for `name`. */
static int stage_copy(int src_fd, const char *name) {
    char tmp[PATH_MAX];
    if (n_staged >= MAX_STAGED || tmp_path(tmp, sizeof tmp, name) != 0) return -1;
    int out = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (out < 0) return -1;
    off_t offset = 0;
    int ok = 1;
    for (;;) {
        ssize_t n = pread(src_fd, copy_buf, sizeof copy_buf, offset);
        if (n < 0) {
            if (errno == EINTR) continue;
            ok = 0;
            break;
        }
        if (n == 0) break;
        if (write_all(out, copy_buf, (size_t)n) != 0) {
            ok = 0;
            break;
        }
        offset += n;
    }
    close(out);
    if (!ok) {
        unlink(tmp);
        return -1;
    }
    strcpy(staged[n_staged++], name);
    return 0;
}

/* Stage a copy of the file `name` in POWERCUT_DIR, reached through `fd` if that is readable.
 * Without a readable descriptor of ours the file is opened afresh by name (see the header
 * comment for what closing that descriptor costs a process holding POSIX locks on it). */
static void stage_file(int fd, const char *name) {
    int mode = fd >= 0 ? fcntl(fd, F_GETFL) : -1;
    if (mode != -1 && (mode & O_ACCMODE) != O_WRONLY) {
        stage_copy(fd, name);
        return;
    }
    char path[PATH_MAX];
    int n = snprintf(path, sizeof path, "%s/%s", watch_dir, name);
    if (n < 0 || (size_t)n >= sizeof path) return;
    int own = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
    if (own < 0) return;
    stage_copy(own, name);
    close(own);
}

/* Stage the list of regular files now in POWERCUT_DIR; with `copies`, a copy of each too.
 * A file this process has open is copied through its own descriptor (found in /proc/self/fd):
 * opening and closing another one would drop the process's POSIX locks on it. */
static void stage_dirlist(int copies) {
    char tmp[PATH_MAX];
    if (n_staged >= MAX_STAGED || tmp_path(tmp, sizeof tmp, DIRLIST) != 0) return;
    DIR *dir = opendir(watch_dir);
    if (!dir) return;
    int out = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (out < 0) {
        closedir(dir);
        return;
    }
    int ok = 1;
    struct dirent *entry;
    while ((entry = readdir(dir)) != NULL) {
        if (!usable_name(entry->d_name)) continue;
        struct stat st;
        if (fstatat(dirfd(dir), entry->d_name, &st, AT_SYMLINK_NOFOLLOW) != 0) continue;
        if (!S_ISREG(st.st_mode)) continue;
        if (write_all(out, entry->d_name, strlen(entry->d_name)) != 0 ||
            write_all(out, "\n", 1) != 0) {
            ok = 0;
            break;
        }
        if (!copies) continue;
        int own_fd = -1;
        DIR *fds = opendir("/proc/self/fd");
        if (fds) {
            struct dirent *fd_entry;
            while ((fd_entry = readdir(fds)) != NULL) {
                char *end;
                long fd = strtol(fd_entry->d_name, &end, 10);
                struct stat fd_st;
                if (*end || end == fd_entry->d_name || fd == dirfd(fds)) continue;
                if (fstat((int)fd, &fd_st) != 0) continue;
                if (fd_st.st_dev != st.st_dev || fd_st.st_ino != st.st_ino) continue;
                int mode = fcntl((int)fd, F_GETFL);
                if (mode != -1 && (mode & O_ACCMODE) != O_WRONLY) {
                    own_fd = (int)fd;
                    break;
                }
            }
            closedir(fds);
        }
        stage_file(own_fd, entry->d_name);
    }
    closedir(dir);
    close(out);
    if (!ok || n_staged >= MAX_STAGED) {
        unlink(tmp);
        return;
    }
    strcpy(staged[n_staged++], DIRLIST);
}

/* What an fsync()/fdatasync() of `fd` makes durable, staged. */
static void stage_for_fd(int fd) {
    struct stat st;
    char link[64], path[PATH_MAX];
    if (fstat(fd, &st) != 0) return;
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, path, sizeof path - 1);
    if (n <= 0) return;
    path[n] = '\0';
    if (S_ISDIR(st.st_mode)) {
        if (strcmp(path, watch_dir) == 0) stage_dirlist(0);
        return;
    }
    if (!S_ISREG(st.st_mode) || st.st_nlink == 0) return; /* unlinked: it has no name left */
    if ((size_t)n <= watch_len + 1 || strncmp(path, watch_dir, watch_len) != 0 ||
        path[watch_len] != '/')
        return;
    const char *name = path + watch_len + 1;
    if (strchr(name, '/') || !usable_name(name)) return; /* only direct children */
    stage_file(fd, name);
}

/* Publish the staged copies (the real call succeeded) or drop them. */
static void finish_staged(int succeeded) {
    for (int i = 0; i < n_staged; i++) {
        char tmp[PATH_MAX], final[PATH_MAX];
        if (tmp_path(tmp, sizeof tmp, staged[i]) != 0) continue;
        if (succeeded && snap_path(final, sizeof final, "", staged[i]) == 0 &&
            rename(tmp, final) == 0)
            continue;
        unlink(tmp);
    }
    n_staged = 0;
}

static int sync_fd(int fd, fd_sync_fn *real, const char *name, int whole_fs) {
    if (!*real) *real = (fd_sync_fn)next_symbol(name);
    if (!*real) {
        errno = ENOSYS;
        return -1;
    }
    if (!enabled || fd < 0) return (*real)(fd);
    int saved = errno;
    pthread_mutex_lock(&guard);
    if (whole_fs) {
        struct stat st;
        if (fstat(fd, &st) == 0 && st.st_dev == watch_dev) stage_dirlist(1);
    } else {
        stage_for_fd(fd);
    }
    errno = saved;
    int rc = (*real)(fd);
    int err = errno;
    finish_staged(rc == 0);
    pthread_mutex_unlock(&guard);
    errno = err;
    return rc;
}

int fsync(int fd) { return sync_fd(fd, &real_fsync_fn, "fsync", 0); }

int fdatasync(int fd) { return sync_fd(fd, &real_fdatasync_fn, "fdatasync", 0); }

int syncfs(int fd) { return sync_fd(fd, &real_syncfs_fn, "syncfs", 1); }

void sync(void) {
    if (!real_sync_fn) real_sync_fn = (sync_fn)next_symbol("sync");
    if (!enabled) {
        if (real_sync_fn) real_sync_fn();
        return;
    }
    int saved = errno;
    pthread_mutex_lock(&guard);
    stage_dirlist(1);
    errno = saved;
    if (real_sync_fn) real_sync_fn();
    finish_staged(real_sync_fn != NULL);
    pthread_mutex_unlock(&guard);
    errno = saved;
}
