/*
 * secretd: the guest side of Guix's secret-service protocol, for the test
 * guest of the hurd-vm service (contrib/guest/build).  Static, libc only.
 *
 * As Guix's guest does (gnu/build/secret-service.scm, secret-service-receive-secrets):
 *   - listen on 0.0.0.0:PORT (default 1004), backlog 1, wait at most TIMEOUT
 *     seconds (default 60) for a client ("did not receive any secrets; time out");
 *   - accept one client, write the hello "(secret-service-server (version 0))",
 *     close the listening socket;
 *   - read one S-expression, which must be
 *       (secrets (version 0) (files ((NAME SIZE MODE) ...)))
 *     ("invalid secrets received" otherwise);
 *   - for each file in order: mkdir -p its parent, delete what is there,
 *     create it, copy exactly SIZE bytes from the socket, chmod it to MODE;
 *   - "received N secret files".
 * Files go under ROOT (default "/"): NAME is "/etc/ssh/...", written to ROOT/NAME.
 *
 * Then (not Guix: the stand-in for the guest's SSH server) it listens on
 * REPORT_PORT (default 22) and answers every connection with one line per
 * installed file, "NAME SIZE MODE SHA256" (MODE: the whole st_mode in octal,
 * as lstat(2) reports it now), and closes; forever.
 *
 * Exit status: 1 when no valid secrets came (the init script then reboots,
 * as Guix's guest does: with QEMU's --no-reboot the VM ends).
 *
 * Usage: secretd [-p PORT] [-r ROOT] [-t TIMEOUT] [-s REPORT_PORT] [-a ADDRESS]
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#define MAX_FILES 1024
#define MAX_NAME 4096

static void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void say(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	fputs("secret service: ", stderr);
	vfprintf(stderr, fmt, ap);
	fputc('\n', stderr);
	va_end(ap);
}

/* ---- buffered reading from the client socket ---- */

static int conn = -1;
static unsigned char rbuf[65536];
static size_t rpos, rlen;

static int next_byte(void) /* -1 at end of stream */
{
	if (rpos == rlen) {
		ssize_t n;
		do
			n = read(conn, rbuf, sizeof rbuf);
		while (n < 0 && errno == EINTR);
		if (n <= 0)
			return -1;
		rpos = 0;
		rlen = (size_t)n;
	}
	return rbuf[rpos++];
}

static int peek_byte(void)
{
	int c = next_byte();
	if (c >= 0)
		rpos--;
	return c;
}

static void skip_ws(void)
{
	for (;;) {
		int c = peek_byte();
		if (c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v') {
			rpos++;
		} else if (c == ';') {
			while ((c = next_byte()) >= 0 && c != '\n')
				;
		} else {
			return;
		}
	}
}

static int expect(char want)
{
	skip_ws();
	return next_byte() == (unsigned char)want ? 0 : -1;
}

static int is_delim(int c)
{
	return c < 0 || c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v' || c == '(' ||
	       c == ')' || c == '"' || c == ';';
}

static int read_token(char *out, size_t size)
{
	size_t n = 0;
	skip_ws();
	while (!is_delim(peek_byte())) {
		int c = next_byte();
		if (n + 1 >= size)
			return -1;
		out[n++] = (char)c;
	}
	out[n] = 0;
	return n ? 0 : -1;
}

static int expect_symbol(const char *sym)
{
	char tok[64];
	return read_token(tok, sizeof tok) == 0 && strcmp(tok, sym) == 0 ? 0 : -1;
}

static int read_integer(long long *value)
{
	char tok[32], *end;
	if (read_token(tok, sizeof tok) < 0)
		return -1;
	errno = 0;
	*value = strtoll(tok, &end, 10);
	return (errno || *end) ? -1 : 0;
}

static int read_string(char *out, size_t size) /* Guile's string syntax */
{
	size_t n = 0;
	skip_ws();
	if (next_byte() != '"')
		return -1;
	for (;;) {
		int c = next_byte();
		if (c < 0)
			return -1;
		if (c == '"')
			break;
		if (c == '\\') {
			c = next_byte();
			switch (c) {
			case 'n': c = '\n'; break;
			case 't': c = '\t'; break;
			case 'r': c = '\r'; break;
			case 'a': c = '\a'; break;
			case 'b': c = '\b'; break;
			case 'f': c = '\f'; break;
			case 'v': c = '\v'; break;
			case '0': c = 0; break;
			case '\\': case '"': break;
			case 'x': {
				unsigned long cp = 0;
				int d;
				while ((d = next_byte()) >= 0 && d != ';') {
					if (d >= '0' && d <= '9') cp = cp * 16 + (unsigned long)(d - '0');
					else if (d >= 'a' && d <= 'f') cp = cp * 16 + (unsigned long)(d - 'a' + 10);
					else if (d >= 'A' && d <= 'F') cp = cp * 16 + (unsigned long)(d - 'A' + 10);
					else return -1;
				}
				if (d < 0 || cp > 0x10FFFF)
					return -1;
				/* UTF-8 encode */
				unsigned char u[4];
				size_t k = 0;
				if (cp < 0x80) u[k++] = (unsigned char)cp;
				else if (cp < 0x800) { u[k++] = 0xC0 | (cp >> 6); u[k++] = 0x80 | (cp & 0x3F); }
				else if (cp < 0x10000) { u[k++] = 0xE0 | (cp >> 12); u[k++] = 0x80 | ((cp >> 6) & 0x3F); u[k++] = 0x80 | (cp & 0x3F); }
				else { u[k++] = 0xF0 | (cp >> 18); u[k++] = 0x80 | ((cp >> 12) & 0x3F); u[k++] = 0x80 | ((cp >> 6) & 0x3F); u[k++] = 0x80 | (cp & 0x3F); }
				if (n + k >= size)
					return -1;
				memcpy(out + n, u, k);
				n += k;
				continue;
			}
			default:
				return -1;
			}
		}
		if (n + 1 >= size || c == 0)
			return -1; /* names with NUL cannot be file names */
		out[n++] = (char)c;
	}
	out[n] = 0;
	return 0;
}

struct secret {
	char name[MAX_NAME];
	long long size, mode;
};
static struct secret files[MAX_FILES];
static int nfiles;

/* (secrets (version 0) (files ((NAME SIZE MODE) ...))) */
static int read_header(void)
{
	long long version;
	if (expect('(') || expect_symbol("secrets") || expect('(') || expect_symbol("version") ||
	    read_integer(&version) || version != 0 || expect(')') || expect('(') || expect_symbol("files") ||
	    expect('('))
		return -1;
	for (;;) {
		skip_ws();
		int c = peek_byte();
		if (c == ')') {
			rpos++;
			break;
		}
		if (nfiles == MAX_FILES)
			return -1;
		struct secret *f = &files[nfiles];
		if (expect('(') || read_string(f->name, sizeof f->name) || read_integer(&f->size) ||
		    read_integer(&f->mode) || expect(')') || f->size < 0 || f->mode < 0)
			return -1;
		nfiles++;
	}
	return (expect(')') || expect(')')) ? -1 : 0;
}

static char root[MAX_NAME] = "/";

static void full_path(char *out, size_t size, const char *name)
{
	size_t r = strlen(root);
	while (r > 0 && root[r - 1] == '/')
		r--;
	snprintf(out, size, "%.*s%s%s", (int)r, root, name[0] == '/' ? "" : "/", name);
}

static int mkdir_p(const char *path)
{
	char tmp[2 * MAX_NAME];
	snprintf(tmp, sizeof tmp, "%s", path);
	for (char *p = tmp + 1; *p; p++) {
		if (*p == '/') {
			*p = 0;
			if (mkdir(tmp, 0755) < 0 && errno != EEXIST)
				return -1;
			*p = '/';
		}
	}
	if (mkdir(tmp, 0755) < 0 && errno != EEXIST)
		return -1;
	return 0;
}

static int install(const struct secret *f)
{
	char path[2 * MAX_NAME], dir[2 * MAX_NAME];
	full_path(path, sizeof path, f->name);
	say("installing file '%s' (%lld bytes)...", f->name, f->size);
	snprintf(dir, sizeof dir, "%s", path);
	char *slash = strrchr(dir, '/');
	if (slash && slash != dir) {
		*slash = 0;
		if (mkdir_p(dir) < 0)
			return -1;
	}
	if (unlink(path) < 0 && errno != ENOENT)
		return -1;
	int fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
	if (fd < 0)
		return -1;
	long long left = f->size;
	while (left > 0) {
		if (rpos == rlen && peek_byte() < 0) {
			close(fd);
			return -1;
		}
		size_t chunk = rlen - rpos;
		if ((long long)chunk > left)
			chunk = (size_t)left;
		if (write(fd, rbuf + rpos, chunk) != (ssize_t)chunk) {
			close(fd);
			return -1;
		}
		rpos += chunk;
		left -= (long long)chunk;
	}
	if (fchmod(fd, (mode_t)(f->mode & 07777)) < 0) {
		close(fd);
		return -1;
	}
	return close(fd);
}

static int listen_on(const char *addr, int port, int backlog)
{
	int s = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0), one = 1;
	struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
	if (s < 0)
		return -1;
	setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
	if (inet_pton(AF_INET, addr, &sa.sin_addr) != 1 || bind(s, (struct sockaddr *)&sa, sizeof sa) < 0 ||
	    listen(s, backlog) < 0) {
		close(s);
		return -1;
	}
	return s;
}

/* ---- SHA-256 (FIPS 180-4) ---- */

static const uint32_t K[64] = {
	0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
	0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
	0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
	0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
	0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
	0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
	0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
	0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2};

struct sha256 {
	uint32_t h[8];
	unsigned char block[64];
	size_t used;
	uint64_t total;
};

#define ROR(x, n) (((x) >> (n)) | ((x) << (32 - (n))))

static void sha256_block(struct sha256 *s, const unsigned char *p)
{
	uint32_t w[64], a, b, c, d, e, f, g, h;
	for (int i = 0; i < 16; i++)
		w[i] = (uint32_t)p[4 * i] << 24 | (uint32_t)p[4 * i + 1] << 16 | (uint32_t)p[4 * i + 2] << 8 | p[4 * i + 3];
	for (int i = 16; i < 64; i++) {
		uint32_t s0 = ROR(w[i - 15], 7) ^ ROR(w[i - 15], 18) ^ (w[i - 15] >> 3);
		uint32_t s1 = ROR(w[i - 2], 17) ^ ROR(w[i - 2], 19) ^ (w[i - 2] >> 10);
		w[i] = w[i - 16] + s0 + w[i - 7] + s1;
	}
	a = s->h[0]; b = s->h[1]; c = s->h[2]; d = s->h[3]; e = s->h[4]; f = s->h[5]; g = s->h[6]; h = s->h[7];
	for (int i = 0; i < 64; i++) {
		uint32_t t1 = h + (ROR(e, 6) ^ ROR(e, 11) ^ ROR(e, 25)) + ((e & f) ^ (~e & g)) + K[i] + w[i];
		uint32_t t2 = (ROR(a, 2) ^ ROR(a, 13) ^ ROR(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
		h = g; g = f; f = e; e = d + t1; d = c; c = b; b = a; a = t1 + t2;
	}
	s->h[0] += a; s->h[1] += b; s->h[2] += c; s->h[3] += d; s->h[4] += e; s->h[5] += f; s->h[6] += g; s->h[7] += h;
}

static void sha256_init(struct sha256 *s)
{
	static const uint32_t init[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
					 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
	memcpy(s->h, init, sizeof init);
	s->used = 0;
	s->total = 0;
}

static void sha256_update(struct sha256 *s, const unsigned char *p, size_t n)
{
	s->total += n;
	while (n > 0) {
		size_t take = 64 - s->used;
		if (take > n)
			take = n;
		memcpy(s->block + s->used, p, take);
		s->used += take;
		p += take;
		n -= take;
		if (s->used == 64) {
			sha256_block(s, s->block);
			s->used = 0;
		}
	}
}

static void sha256_hex(struct sha256 *s, char out[65])
{
	uint64_t bits = s->total * 8;
	unsigned char pad = 0x80, zero = 0, len[8];
	sha256_update(s, &pad, 1);
	while (s->used != 56)
		sha256_update(s, &zero, 1);
	for (int i = 0; i < 8; i++)
		len[i] = (unsigned char)(bits >> (56 - 8 * i));
	sha256_update(s, len, 8);
	for (int i = 0; i < 8; i++)
		sprintf(out + 8 * i, "%08x", s->h[i]);
}

static void report(int client)
{
	for (int i = 0; i < nfiles; i++) {
		char path[2 * MAX_NAME], line[2 * MAX_NAME + 128], hex[65] = "-";
		struct stat st;
		full_path(path, sizeof path, files[i].name);
		if (lstat(path, &st) < 0) {
			snprintf(line, sizeof line, "%s missing\n", files[i].name);
		} else {
			int fd = open(path, O_RDONLY | O_CLOEXEC);
			if (fd >= 0) {
				struct sha256 s;
				unsigned char buf[8192];
				ssize_t n;
				sha256_init(&s);
				while ((n = read(fd, buf, sizeof buf)) > 0)
					sha256_update(&s, buf, (size_t)n);
				close(fd);
				sha256_hex(&s, hex);
			}
			snprintf(line, sizeof line, "%s %lld %o %s\n", files[i].name, (long long)st.st_size,
				 (unsigned)st.st_mode, hex);
		}
		size_t len = strlen(line), off = 0;
		while (off < len) {
			ssize_t w = write(client, line + off, len - off);
			if (w <= 0)
				return;
			off += (size_t)w;
		}
	}
}

int main(int argc, char **argv)
{
	int port = 1004, report_port = 22, timeout = 60, opt;
	const char *addr = "0.0.0.0";
	while ((opt = getopt(argc, argv, "p:r:t:s:a:")) != -1) {
		switch (opt) {
		case 'p': port = atoi(optarg); break;
		case 'r': snprintf(root, sizeof root, "%s", optarg); break;
		case 't': timeout = atoi(optarg); break;
		case 's': report_port = atoi(optarg); break;
		case 'a': addr = optarg; break;
		default:
			fprintf(stderr, "usage: %s [-p PORT] [-r ROOT] [-t TIMEOUT] [-s REPORT_PORT] [-a ADDRESS]\n", argv[0]);
			return 2;
		}
	}
	signal(SIGPIPE, SIG_IGN);
	setvbuf(stderr, NULL, _IOLBF, 0);
	int lsock = listen_on(addr, port, 1);
	if (lsock < 0) {
		say("cannot listen on %s:%d: %s", addr, port, strerror(errno));
		return 1;
	}
	say("waiting for secrets on %s:%d...", addr, port);
	struct pollfd pfd = {.fd = lsock, .events = POLLIN};
	int r;
	do
		r = poll(&pfd, 1, timeout * 1000);
	while (r < 0 && errno == EINTR);
	if (r <= 0) {
		say("did not receive any secrets; time out");
		return 1;
	}
	struct sockaddr_in peer;
	socklen_t plen = sizeof peer;
	conn = accept4(lsock, (struct sockaddr *)&peer, &plen, SOCK_CLOEXEC);
	if (conn < 0) {
		say("accept: %s", strerror(errno));
		return 1;
	}
	char ip[INET_ADDRSTRLEN] = "?";
	inet_ntop(AF_INET, &peer.sin_addr, ip, sizeof ip);
	say("client connection from %s", ip);
	static const char hello[] = "(secret-service-server (version 0))";
	if (write(conn, hello, sizeof hello - 1) != (ssize_t)(sizeof hello - 1)) {
		say("cannot send the hello: %s", strerror(errno));
		return 1;
	}
	close(lsock);
	if (read_header() < 0) {
		say("invalid secrets received");
		return 1;
	}
	for (int i = 0; i < nfiles; i++) {
		if (install(&files[i]) < 0) {
			say("installing '%s' failed: %s", files[i].name, errno ? strerror(errno) : "end of stream");
			return 1;
		}
	}
	say("received %d secret files", nfiles);
	close(conn);

	int rsock = listen_on(addr, report_port, 16);
	if (rsock < 0) {
		say("cannot listen on %s:%d: %s", addr, report_port, strerror(errno));
		return 1;
	}
	say("reporting on %s:%d", addr, report_port);
	for (;;) {
		int c = accept4(rsock, NULL, NULL, SOCK_CLOEXEC);
		if (c < 0) {
			if (errno == EINTR)
				continue;
			sleep(1);
			continue;
		}
		report(c);
		shutdown(c, SHUT_WR);
		close(c);
	}
}
