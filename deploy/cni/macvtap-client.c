/*
 * macvtap CNI plugin: native thin client (optional, built by deploy/cni/install-plugin when cc exists).
 *
 * A Python interpreter needs ~8 ms just to start on these machines, a Go plugin ~3 ms. This client
 * starts in well under a millisecond, hands the call to `macvtap daemon` over its unix socket using
 * the binary protocol of cni_macvtap/wire.py, and prints the daemon's answer. Whenever the daemon
 * cannot answer (no socket, refused, other network namespace, unusual config) it execs the Python
 * plugin (MACVTAP_PYTHON -IS MACVTAP_LAUNCHER) with the same environment and the same stdin, so the
 * result is always produced by the same code in cni_macvtap.plugin.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <unistd.h>

#ifndef MACVTAP_PYTHON
#error "build with -DMACVTAP_PYTHON=\"/path/to/python3\""
#endif
#ifndef MACVTAP_LAUNCHER
#error "build with -DMACVTAP_LAUNCHER=\"/path/to/python launcher\""
#endif
#define DEFAULT_SOCKET "/run/edgevirt/macvtap.sock"
#define MAX_FRAME (16u * 1024u * 1024u)

extern char **environ;

static char *read_all(int fd, size_t *len) {
    size_t cap = 8192, n = 0;
    char *buf = malloc(cap);
    for (;;) {
        if (!buf) return NULL;
        if (n == cap) buf = realloc(buf, cap *= 2);
        if (!buf) return NULL;
        ssize_t r = read(fd, buf + n, cap - n);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) break;
        n += (size_t)r;
    }
    *len = n;
    return buf;
}

static int read_exact(int fd, void *dst, size_t n) {
    char *p = dst;
    while (n) {
        ssize_t r = read(fd, p, n);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) return -1;
        p += r;
        n -= (size_t)r;
    }
    return 0;
}

static void write_all(int fd, const char *p, size_t n) {
    while (n) {
        ssize_t r = write(fd, p, n);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) return;
        p += r;
        n -= (size_t)r;
    }
}

/* 0: key absent (default socket); 1: simple string value copied to out; -1: let Python parse it. */
static int daemon_socket(const char *in, size_t len, char *out, size_t outsz) {
    static const char key[] = "\"daemonSocket\"";
    const char *hit = memmem(in, len, key, sizeof key - 1);
    if (!hit) return 0;
    const char *end = in + len, *p = hit + sizeof key - 1;
    if (memmem(p, (size_t)(end - p), key, sizeof key - 1)) return -1;
    while (p < end && strchr(" \t\r\n", *p)) p++;
    if (p >= end || *p++ != ':') return -1;
    while (p < end && strchr(" \t\r\n", *p)) p++;
    if (p >= end || *p++ != '"') return -1;
    const char *q = p;
    while (q < end && *q != '"' && *q != '\\') q++;
    if (q >= end || *q != '"' || q == p || *p != '/' || (size_t)(q - p) >= outsz) return -1;
    memcpy(out, p, (size_t)(q - p));
    out[q - p] = 0;
    return 1;
}

static void run_python(const char *in, size_t len, int no_daemon) {
    int fd = memfd_create("macvtap-stdin", MFD_CLOEXEC);
    if (fd >= 0) {
        write_all(fd, in, len);
        lseek(fd, 0, SEEK_SET);
        dup2(fd, 0); /* dup2 clears close-on-exec on fd 0 */
    }
    if (no_daemon) setenv("MACVTAP_NO_DAEMON", "1", 1);
    char *argv[] = {MACVTAP_PYTHON, "-IS", MACVTAP_LAUNCHER, NULL};
    execv(MACVTAP_PYTHON, argv);
    printf("{\n    \"cniVersion\": \"1.1.0\",\n    \"code\": 999,\n    \"msg\": \"macvtap: cannot exec %s: %s\"\n}\n",
           MACVTAP_PYTHON, strerror(errno));
    exit(1);
}

static void put32(unsigned char *b, uint32_t v) {
    b[0] = v >> 24; b[1] = v >> 16; b[2] = v >> 8; b[3] = v;
}

static uint32_t get32(const unsigned char *b) {
    return (uint32_t)b[0] << 24 | (uint32_t)b[1] << 16 | (uint32_t)b[2] << 8 | b[3];
}

int main(int argc, char **argv) {
    signal(SIGPIPE, SIG_IGN); /* a vanished daemon or reader is an error to report, not a reason to die */
    if (argc > 1) { /* `macvtap daemon ...` and --help are the Python program's business */
        char **args = calloc((size_t)argc + 3, sizeof *args);
        if (!args) return 1;
        args[0] = MACVTAP_PYTHON; args[1] = "-IS"; args[2] = MACVTAP_LAUNCHER;
        for (int i = 1; i < argc; i++) args[i + 2] = argv[i];
        execv(MACVTAP_PYTHON, args);
        perror("macvtap: exec python");
        return 1;
    }
    if (!getenv("CNI_COMMAND") && isatty(0)) { /* a human at a terminal: the Python side prints usage */
        char *usage[] = {MACVTAP_PYTHON, "-IS", MACVTAP_LAUNCHER, NULL};
        execv(MACVTAP_PYTHON, usage);
    }
    size_t len = 0;
    char *in = read_all(0, &len);
    if (!in) run_python("", 0, 0);
    if (getenv("MACVTAP_NO_DAEMON")) run_python(in, len, 1);
    char path[sizeof(((struct sockaddr_un *)0)->sun_path)];
    int found = daemon_socket(in, len, path, sizeof path);
    if (found < 0) run_python(in, len, 0);
    if (found == 0) strcpy(path, DEFAULT_SOCKET);

    int s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    strcpy(addr.sun_path, path);
    if (s < 0 || connect(s, (struct sockaddr *)&addr, sizeof addr) != 0) run_python(in, len, 1);
    struct timeval tv = {.tv_sec = 180};
    setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);

    size_t envlen = 0;
    for (char **e = environ; *e; e++)
        if (**e != '=' && strchr(*e, '=')) envlen += strlen(*e) + 1;
    char *envblob = malloc(envlen ? envlen : 1);
    size_t off = 0;
    for (char **e = environ; *e && envblob; e++) {
        if (**e == '=' || !strchr(*e, '=')) continue;
        size_t l = strlen(*e);
        memcpy(envblob + off, *e, l);
        off += l;
        envblob[off++] = 0;
    }
    if (envlen) envlen--; /* entries are separated, not terminated, by NUL */
    struct stat st;
    uint64_t ino = stat("/proc/self/ns/net", &st) == 0 ? (uint64_t)st.st_ino : 0;
    unsigned char hdr[20];
    memcpy(hdr, "MVT1", 4);
    put32(hdr + 4, (uint32_t)(ino >> 32));
    put32(hdr + 8, (uint32_t)ino);
    put32(hdr + 12, (uint32_t)envlen);
    put32(hdr + 16, (uint32_t)len);
    struct iovec iov[3] = {{hdr, sizeof hdr}, {envblob, envlen}, {in, len}};
    size_t total = sizeof hdr + envlen + len;
    ssize_t sent = 0;
    for (int i = 0; i < 3 && envblob; i++) {
        size_t done = 0;
        while (done < iov[i].iov_len) {
            ssize_t r = send(s, (char *)iov[i].iov_base + done, iov[i].iov_len - done, MSG_NOSIGNAL);
            if (r < 0 && errno == EINTR) continue;
            if (r <= 0) break;
            done += (size_t)r;
            sent += r;
        }
    }
    if ((size_t)sent != total) run_python(in, len, 1); /* the daemon went away before reading it */

    unsigned char rep[16];
    if (read_exact(s, rep, sizeof rep) != 0 || memcmp(rep, "MVT1", 4) != 0) goto mid_request;
    int32_t code = (int32_t)get32(rep + 4);
    uint32_t outlen = get32(rep + 8), errlen = get32(rep + 12);
    if (code == -1) run_python(in, len, 1);
    if (outlen > MAX_FRAME || errlen > MAX_FRAME) goto mid_request;
    char *out = malloc((size_t)outlen + errlen + 1);
    if (!out || read_exact(s, out, (size_t)outlen + errlen) != 0) goto mid_request;
    write_all(1, out, outlen);
    write_all(2, out + outlen, errlen);
    return code;

mid_request:
    /* The daemon got the request: we cannot know how far it went, so the runtime must retry (code 11). */
    printf("{\n    \"cniVersion\": \"1.1.0\",\n    \"code\": 11,\n    \"msg\": \"macvtap daemon at %s failed "
           "mid-request: try again\"\n}\n", path);
    return 1;
}
