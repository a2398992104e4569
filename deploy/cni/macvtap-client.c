/*
 * macvtap CNI plugin: native thin client (optional, built by deploy/cni/install-plugin when cc exists).
 *
 * A Python interpreter needs ~8 ms just to start on these machines, a Go plugin ~3 ms. This client
 * starts in well under a millisecond, hands the call to `macvtap daemon` over its unix socket using
 * the binary protocol of cni_macvtap/wire.py, and prints the daemon's answer. Whenever the daemon
 * cannot answer (no socket, refused, other network namespace, unusual config) it execs the Python
 * plugin (MACVTAP_PYTHON -IS MACVTAP_LAUNCHER) with the same environment and the same stdin, so the
 * result is always produced by the same code in cni_macvtap.plugin.
 *
 * Daemon-only build (-DMACVTAP_DAEMON_ONLY, static): the copy the edgevirt-node DaemonSet puts into
 * the host's CNI bin dir, where no Python with edgevirt exists. It never execs anything: when the
 * daemon cannot answer it fails with CNI error 11 (try again later) naming the daemon's socket, so
 * the runtime retries until the DaemonSet's daemon runs; what the Python plugin would refuse without
 * the daemon (a config over the stdin limit, MACVTAP_NO_DAEMON) it refuses itself, with its codes.
 *
 * The default socket, the limits and the wire constants come from a header rendered from the Python
 * package at build time (cni_macvtap.cheader; install-plugin passes it with -include): one definition.
 * stdin is read up to MACVTAP_MAX_STDIN + 1 bytes; a larger config goes to the Python plugin, which
 * refuses it (code 5) without reading the rest.
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

#ifndef MACVTAP_DAEMON_ONLY
#ifndef MACVTAP_PYTHON
#error "build with -DMACVTAP_PYTHON=\"/path/to/python3\" (or -DMACVTAP_DAEMON_ONLY)"
#endif
#ifndef MACVTAP_LAUNCHER
#error "build with -DMACVTAP_LAUNCHER=\"/path/to/python launcher\" (or -DMACVTAP_DAEMON_ONLY)"
#endif
#endif
#ifndef MACVTAP_DEFAULT_SOCKET
#error "build with -include of the header `python -m cni_macvtap.cheader` prints (install-plugin does)"
#endif

extern char **environ;

/* At most max bytes of fd (max + 1 tells "too large" apart); NULL when out of memory. */
static char *read_bounded(int fd, size_t max, size_t *len) {
    size_t cap = 8192, n = 0;
    char *buf = malloc(cap);
    while (buf && n < max) {
        if (n == cap) {
            size_t next = cap * 2 > max ? max : cap * 2;
            char *grown = realloc(buf, next);
            if (!grown) { free(buf); return NULL; }
            buf = grown;
            cap = next;
        }
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

static const char *skip_ws(const char *p, const char *end) {
    while (p < end && (*p == ' ' || *p == '\t' || *p == '\r' || *p == '\n')) p++;
    return p;
}

/* The closing quote of the string opening at p, or NULL. */
static const char *string_end(const char *p, const char *end) {
    for (const char *q = p + 1; q < end; q++) {
        if (*q == '\\') q++;
        else if (*q == '"') return q;
    }
    return NULL;
}

/* The top-level member "daemonSocket" (the same scan as cni_macvtap/jsonscan.py): 0 absent or not an
 * absolute path (default socket); 1 a plain string copied to out; -1 unsure (escapes, duplicates, non-string value, nesting
 * too deep, broken JSON, too long for out): let the Python plugin parse it. */
static int daemon_socket(const char *in, size_t len, char *out, size_t outsz) {
    static const char key[] = "daemonSocket";
    const char *p = skip_ws(in, in + len), *end = in + len;
    char stack[256];
    int depth = 0, found = 0;
    if (p >= end || *p != '{') return -1;
    while (p < end) {
        if (*p == '"') {
            const char *q = string_end(p, end);
            if (!q) return -1;
            const char *after = skip_ws(q + 1, end);
            if (depth == 1 && after < end && *after == ':') {
                if (memchr(p + 1, '\\', (size_t)(q - p - 1))) return -1;
                if ((size_t)(q - p - 1) == sizeof key - 1 && !memcmp(p + 1, key, sizeof key - 1)) {
                    const char *v = skip_ws(after + 1, end), *w;
                    if (found || v >= end || *v != '"' || !(w = string_end(v, end))) return -1;
                    size_t n = (size_t)(w - v - 1);
                    if (memchr(v + 1, '\\', n) || n >= outsz) return -1;
                    memcpy(out, v + 1, n);
                    out[n] = 0;
                    /* like cli.socket_path: a value that is not an absolute path means the default */
                    found = n && v[1] == '/' && !memchr(v + 1, 0, n) ? 1 : 2;
                    after = w + 1;
                }
            }
            p = after;
            continue;
        }
        if (*p == '{' || *p == '[') {
            if (depth == (int)sizeof stack) return -1;
            stack[depth++] = *p == '{' ? '}' : ']';
        } else if (*p == '}' || *p == ']') {
            if (depth == 0 || stack[--depth] != *p) return -1;
            if (depth == 0) return skip_ws(p + 1, end) == end ? found % 2 : -1;
        }
        p++;
    }
    return -1;
}

/* Why a call is not (or not fully) handed to the daemon: the Python plugin then runs it in-process,
 * the daemon-only build answers with an error instead. */
enum fallback { NO_MEMORY, NO_DAEMON_ASKED, TOO_LARGE_STDIN, TOO_LARGE_ENV, UNREACHABLE, HANDED_BACK };

#ifdef MACVTAP_DAEMON_ONLY
/* t as the inside of a JSON string. */
static void json_text(const char *t) {
    for (; *t; t++) {
        if (*t == '"' || *t == '\\') printf("\\%c", *t);
        else if ((unsigned char)*t < 0x20) printf("\\u%04x", (unsigned char)*t);
        else putchar(*t);
    }
}

/* A CNI error object on stdout, then exit 1 (what a failed CNI call prints). */
__attribute__((noreturn)) static void cni_error(int code, const char *msg, const char *detail) {
    printf("{\n    \"cniVersion\": \"1.1.0\",\n    \"code\": %d,\n    \"msg\": \"", code);
    json_text(msg);
    printf("\",\n    \"details\": \"");
    json_text(detail);
    printf("\"\n}\n");
    fflush(stdout);
    exit(1);
}

static const char *daemon_path = MACVTAP_DEFAULT_SOCKET;

__attribute__((noreturn)) static void fallback(enum fallback why, const char *in, size_t len, int no_daemon) {
    char detail[512];
    (void)in; (void)len; (void)no_daemon;
    switch (why) {
    case NO_MEMORY:
        cni_error(999, "macvtap: out of memory", "");
    case NO_DAEMON_ASKED:
        cni_error(4, "MACVTAP_NO_DAEMON is set, but this macvtap is the daemon-only build (the edgevirt-node "
                     "DaemonSet's copy): unset it", "");
    case TOO_LARGE_STDIN:
        snprintf(detail, sizeof detail, "the network config on stdin is over %u bytes", MACVTAP_MAX_STDIN);
        cni_error(5, "network config too large", detail);
    case TOO_LARGE_ENV:
        snprintf(detail, sizeof detail, "the environment is over the daemon's limit of %u bytes", MACVTAP_MAX_ENV);
        cni_error(4, "environment too large for the macvtap daemon", detail);
    case UNREACHABLE:
        snprintf(detail, sizeof detail, "%s: %s", daemon_path, strerror(errno));
        cni_error(11, "macvtap daemon not reachable: try again later (it runs in the edgevirt-node DaemonSet; "
                      "this plugin does no work of its own)", detail);
    case HANDED_BACK:
        snprintf(detail, sizeof detail, "%s handed the call back (busy, or the caller is in another network "
                 "namespace than the daemon)", daemon_path);
        cni_error(11, "macvtap daemon cannot serve this call now: try again later", detail);
    }
    exit(1);
}
#else
__attribute__((noreturn)) static void fallback(enum fallback why, const char *in, size_t len, int no_daemon) {
    (void)why;
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
#endif

static void put32(unsigned char *b, uint32_t v) {
    b[0] = v >> 24; b[1] = v >> 16; b[2] = v >> 8; b[3] = v;
}

static uint32_t get32(const unsigned char *b) {
    return (uint32_t)b[0] << 24 | (uint32_t)b[1] << 16 | (uint32_t)b[2] << 8 | b[3];
}

int main(int argc, char **argv) {
    signal(SIGPIPE, SIG_IGN); /* a vanished daemon or reader is an error to report, not a reason to die */
#ifdef MACVTAP_DAEMON_ONLY
    if (argc > 1 || (!getenv("CNI_COMMAND") && isatty(0))) {
        fprintf(stderr, "usage: macvtap   (CNI plugin: CNI_* in the environment, config on stdin)\n"
                        "This is the daemon-only build that the edgevirt-node DaemonSet installs: every call "
                        "goes to the macvtap daemon (default socket %s), which runs in that DaemonSet.\n",
                MACVTAP_DEFAULT_SOCKET);
        return argc > 1 && (!strcmp(argv[1], "-h") || !strcmp(argv[1], "--help")) ? 0 : 2;
    }
#else
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
#endif
    size_t len = 0;
    char *in = read_bounded(0, MACVTAP_MAX_STDIN + 1, &len);
    if (!in) fallback(NO_MEMORY, "", 0, 0);
    if (getenv("MACVTAP_NO_DAEMON")) fallback(NO_DAEMON_ASKED, in, len, 1);
    if (len > MACVTAP_MAX_STDIN) fallback(TOO_LARGE_STDIN, in, len, 1);
    char path[sizeof(((struct sockaddr_un *)0)->sun_path)];
    int found = daemon_socket(in, len, path, sizeof path);
#ifdef MACVTAP_DAEMON_ONLY
    /* unsure (escapes, broken JSON...): any daemon of this node does the same work, and the daemon
     * parses the config properly (a broken one gets its decoding error from there) */
    if (found <= 0) strcpy(path, MACVTAP_DEFAULT_SOCKET);
    daemon_path = path;
#else
    if (found < 0) fallback(UNREACHABLE, in, len, 0);
    if (found == 0) strcpy(path, MACVTAP_DEFAULT_SOCKET);
#endif

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
    if (envlen > MACVTAP_MAX_ENV) fallback(TOO_LARGE_ENV, in, len, 1); /* beyond the daemon's limit */

    int s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (s < 0) fallback(UNREACHABLE, in, len, 1);
    struct timeval tv = {.tv_sec = MACVTAP_CLIENT_TIMEOUT_S};
    setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(s, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv); /* also bounds connect() to a full backlog */
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    strcpy(addr.sun_path, path);
    if (connect(s, (struct sockaddr *)&addr, sizeof addr) != 0) fallback(UNREACHABLE, in, len, 1);
    struct stat st;
    uint64_t ino = stat("/proc/self/ns/net", &st) == 0 ? (uint64_t)st.st_ino : 0;
    unsigned char hdr[20];
    memcpy(hdr, MACVTAP_WIRE_MAGIC, 4);
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
    if ((size_t)sent != total) fallback(UNREACHABLE, in, len, 1); /* the daemon went away before reading it */

    unsigned char rep[16];
    if (read_exact(s, rep, sizeof rep) != 0 || memcmp(rep, MACVTAP_WIRE_MAGIC, 4) != 0) goto mid_request;
    int32_t code = (int32_t)get32(rep + 4);
    uint32_t outlen = get32(rep + 8), errlen = get32(rep + 12);
    if (code == MACVTAP_WIRE_FALLBACK) fallback(HANDED_BACK, in, len, 1);
    if (outlen > MACVTAP_MAX_REPLY || errlen > MACVTAP_MAX_REPLY) goto mid_request;
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
