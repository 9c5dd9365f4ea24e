/*
 * h2gen: the benchmarks' load generator, a gRPC client on raw HTTP/2 frames.
 *
 * Built at run time by benchmarks/h2gen.py (gcc -O2) and driven by benchmarks/run.py over
 * stdin/stdout like the old grpcio clients: it connects and sets up its streams, prints
 * "ready", waits for "go" on stdin, runs its scenario (bounded in time), prints one JSON line
 * of results and exits (the "idle" scenario first prints "holding" and waits for "stop").
 *
 * Why C: the servers under test spend 25-90 us of CPU per message; grpcio's C-core clients
 * spent 100-250 us per received message on the same two cores, so they, not the servers,
 * bounded the paced load. This client never decodes what it does not need: it walks each
 * response's top-level protobuf fields only as far as the `type` field (and a
 * CreateSessionResponse's session id), never decodes HPACK (the server's header blocks are
 * skipped; a stream's end is its END_STREAM flag), and writes one socket write per connection
 * per pass of its epoll loop.
 *
 * Every protobuf field number and enum value comes from the command line (benchmarks/h2gen.py
 * reads them from chat.proto's descriptors), so chat.proto stays the one schema.
 *
 * Arguments are key=value pairs; see struct config. Results are in seconds.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

/* -- configuration ------------------------------------------------------------------------ */

struct config {
    const char *scenario; /* throughput | paced | probe | idle | relay */
    const char *host;
    const char *port;
    const char *authority;
    int streams;
    int per_conn;      /* Chat streams per connection */
    double duration;   /* throughput, probe: seconds of measurement; relay: time limit */
    const char *text;  /* the MESSAGE text */
    int messages;      /* paced, relay: messages per stream */
    double interval;   /* paced: seconds between a stream's messages */
    double grace;      /* paced: seconds answers still due may take after the last send */
    double gap;        /* probe: pause between requests */
    double stagger;    /* relay: streams start over this many seconds (0: all at once) */
    double drain;      /* throughput: seconds replies in flight get after the window */
    double setup_timeout;
    int max_samples;   /* probe */
    int warm;          /* throughput, relay: one reply per stream before "ready" */
    int setup_concurrency; /* streams being set up at once (see start_setups) */
    /* chat.proto, from its descriptors */
    int f_req_type, f_req_session, f_req_message, f_req_request_id;
    int v_req_ping;
    int f_resp_type, v_chunk, v_complete, v_error, v_pong, f_resp_error_message;
    int f_create_title, f_create_resp_session;
    const char *path_chat, *path_create;
};

static struct config cfg = {
    .scenario = "throughput",
    .host = "127.0.0.1",
    .port = "50051",
    .streams = 1,
    .per_conn = 100,
    .duration = 4.0,
    .text = "hello",
    .messages = 1,
    .interval = 1.0,
    .grace = 3.0,
    .gap = 0.01,
    .drain = 10.0,
    .setup_timeout = 60.0,
    .max_samples = 10000,
    .warm = 1,
    .setup_concurrency = 64,
    .f_req_type = -1,
};

static void die(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs("h2gen: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(2);
}

static void parse_args(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        char *eq = strchr(argv[i], '=');
        if (!eq) die("argument %s is not key=value", argv[i]);
        *eq = 0;
        const char *k = argv[i], *v = eq + 1;
#define S(name) if (!strcmp(k, #name)) { cfg.name = v; continue; }
#define I(name) if (!strcmp(k, #name)) { cfg.name = atoi(v); continue; }
#define D(name) if (!strcmp(k, #name)) { cfg.name = atof(v); continue; }
        S(scenario) S(host) S(port) S(authority) I(streams) I(per_conn) D(duration) S(text)
        I(messages) D(interval) D(grace) D(gap) D(stagger) D(drain) D(setup_timeout) I(max_samples) I(warm)
        I(setup_concurrency)
        I(f_req_type) I(f_req_session) I(f_req_message) I(f_req_request_id) I(v_req_ping)
        I(f_resp_type) I(v_chunk) I(v_complete) I(v_error) I(v_pong) I(f_resp_error_message) I(f_create_title)
        I(f_create_resp_session) S(path_chat) S(path_create)
#undef S
#undef I
#undef D
        die("unknown argument %s", k);
    }
    if (cfg.f_req_type < 0 || !cfg.path_chat || !cfg.path_create)
        die("the chat.proto field numbers and paths are required (see benchmarks/h2gen.py)");
    if (cfg.streams < 1 || cfg.per_conn < 1) die("streams and per_conn must be >= 1");
    if (!cfg.authority) {
        static char auth[300];
        snprintf(auth, sizeof auth, "%s:%s", cfg.host, cfg.port);
        cfg.authority = auth;
    }
}

/* -- small helpers ------------------------------------------------------------------------ */

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static double cpu_seconds(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec * 1e-6 +
           (double)ru.ru_stime.tv_sec + (double)ru.ru_stime.tv_usec * 1e-6;
}

typedef struct {
    uint8_t *p;
    size_t len, cap, off; /* off: bytes already consumed from the front */
} buf_t;

static void buf_reserve(buf_t *b, size_t extra) {
    if (b->len + extra <= b->cap) return;
    size_t cap = b->cap ? b->cap : 256;
    while (cap < b->len + extra) cap *= 2;
    b->p = realloc(b->p, cap);
    if (!b->p) die("out of memory");
    b->cap = cap;
}

static void buf_put(buf_t *b, const void *data, size_t n) {
    buf_reserve(b, n);
    memcpy(b->p + b->len, data, n);
    b->len += n;
}

static void buf_compact(buf_t *b) {
    if (b->off == 0) return;
    memmove(b->p, b->p + b->off, b->len - b->off);
    b->len -= b->off;
    b->off = 0;
}

typedef struct {
    double *v;
    size_t n, cap;
} samples_t;

static void sample(samples_t *s, double x) {
    if (s->n == s->cap) {
        s->cap = s->cap ? s->cap * 2 : 1024;
        s->v = realloc(s->v, s->cap * sizeof *s->v);
        if (!s->v) die("out of memory");
    }
    s->v[s->n++] = x;
}

/* protobuf: varints and the fields a request needs */

static size_t put_varint(uint8_t *out, uint64_t v) {
    size_t n = 0;
    while (v >= 0x80) {
        out[n++] = (uint8_t)(v | 0x80);
        v >>= 7;
    }
    out[n++] = (uint8_t)v;
    return n;
}

static int get_varint(const uint8_t **p, const uint8_t *end, uint64_t *v) {
    uint64_t r = 0;
    for (int shift = 0; shift < 64 && *p < end; shift += 7) {
        uint8_t b = *(*p)++;
        r |= (uint64_t)(b & 0x7f) << shift;
        if (!(b & 0x80)) {
            *v = r;
            return 1;
        }
    }
    return 0;
}

static void pb_string(buf_t *b, int field, const char *s, size_t n) {
    if (n == 0) return; /* proto3: defaults are not written */
    uint8_t tmp[20];
    size_t k = put_varint(tmp, (uint64_t)field << 3 | 2);
    k += put_varint(tmp + k, n);
    buf_put(b, tmp, k);
    buf_put(b, s, n);
}

static void pb_enum(buf_t *b, int field, int v) {
    if (v == 0) return;
    uint8_t tmp[20];
    size_t k = put_varint(tmp, (uint64_t)field << 3 | 0);
    k += put_varint(tmp + k, (uint64_t)v);
    buf_put(b, tmp, k);
}

/*
 * Walks a message's top-level fields: the value of varint field `want_varint` (default 0,
 * which proto3 leaves out) and, if `want_string` > 0, where that string field is.
 */
static int pb_scan(const uint8_t *p, size_t n, int want_varint, int want_string,
                   const uint8_t **str, size_t *str_len) {
    const uint8_t *end = p + n;
    int found = 0;
    while (p < end) {
        uint64_t tag, v;
        if (!get_varint(&p, end, &tag)) break;
        int field = (int)(tag >> 3), wt = (int)(tag & 7);
        if (wt == 0) {
            if (!get_varint(&p, end, &v)) break;
            if (field == want_varint) {
                found = (int)v;
                if (want_string <= 0) return found; /* the common case: type comes first */
            }
        } else if (wt == 1) {
            p += 8;
        } else if (wt == 5) {
            p += 4;
        } else if (wt == 2) {
            if (!get_varint(&p, end, &v) || v > (uint64_t)(end - p)) break;
            if (field == want_string && str) {
                *str = p;
                *str_len = (size_t)v;
            }
            p += v;
        } else {
            break;
        }
    }
    return found;
}

/* -- HTTP/2 ---------------------------------------------------------------------------------- */

enum { F_DATA, F_HEADERS, F_PRIORITY, F_RST, F_SETTINGS, F_PUSH, F_PING, F_GOAWAY, F_WINDOW,
       F_CONTINUATION };
enum { END_STREAM = 1, ACK = 1, END_HEADERS = 4, PADDED = 8, PRIORITY_FLAG = 0x20 };
#define OUR_WINDOW 0x7fffffff
#define REPLENISH (1u << 30)

struct conn;

enum kind { K_CHAT, K_CREATE };
enum state { S_NEW, S_OPENING, S_WARMING, S_READY, S_BUSY, S_DONE, S_FAILED };

typedef struct stream {
    struct conn *c;
    int index; /* which of the scenario's streams (for K_CREATE: whose session) */
    enum kind kind;
    enum state state;
    uint32_t id; /* 0 until opened */
    int closed;  /* END_STREAM or RST_STREAM seen */
    int headers_seen; /* the response's first header block came */
    /* sending */
    buf_t out;
    int64_t send_window;
    int end_after_out;
    int blocked;
    /* receiving: the gRPC length-prefixed messages across DATA frames */
    uint8_t head[5];
    int head_have;
    uint32_t msg_len;
    buf_t msg;
    uint64_t recv_unacked;
    /* the scenario */
    char session[80];
    size_t session_len;
    long rid;
    int sent, answered, chunks_in_reply;
    double *sent_at; /* paced: per message; others: [0] */
    double last_chunk;
    enum { P_WAIT_PONG, P_PAUSE_MESSAGE, P_WAIT_REPLY, P_PAUSE_PING } probe;
    double next_at; /* probe: when the pause ends */
    const char *why; /* a failure */
} stream_t;

typedef struct conn {
    int fd;
    int index;
    buf_t in, out;
    int want_out; /* EPOLLOUT armed */
    int dirty;    /* on the flush list */
    struct conn *next_dirty;
    uint32_t next_id;
    stream_t **by_id; /* (id - 1) / 2 -> stream */
    size_t by_id_cap;
    int64_t send_window;
    int64_t peer_initial_window;
    uint32_t peer_max_frame;
    uint32_t peer_max_streams;
    uint64_t recv_unacked;
    int open_streams;
    int blocked;
    int dead;
    uint32_t continuation; /* a header block continues on this stream */
    int continuation_ends;
    /* streams waiting for a free slot (MAX_CONCURRENT_STREAMS) */
    stream_t **queue;
    size_t queue_len, queue_cap, queue_head;
    stream_t **chats; /* this connection's Chat streams */
    int n_chats;
} conn_t;

static conn_t *conns;
static int n_conns;
static stream_t *chats; /* cfg.streams Chat streams */
static conn_t *dirty_head;
static int epfd;

/* results and accounting */
static long long messages_in, chunks_in_window, replies_in_window;
static int failures_n;
static char failures[5][160];
static samples_t s_a, s_b; /* probe: ping, first chunk; paced: answers; relay: ttft, itl */
static int ready_count, settled_count; /* streams through setup; streams done or failed */
static int running, measuring, opened_count;
static double t_go, t_end, t_stop;

static void fail(stream_t *s, const char *why);
static void start_setups(void);

static void mark_dirty(conn_t *c) {
    if (!c->dirty) {
        c->dirty = 1;
        c->next_dirty = dirty_head;
        dirty_head = c;
    }
}

static void frame(conn_t *c, uint32_t len, uint8_t type, uint8_t flags, uint32_t sid) {
    uint8_t h[9] = {(uint8_t)(len >> 16), (uint8_t)(len >> 8), (uint8_t)len, type, flags,
                    (uint8_t)(sid >> 24 & 0x7f), (uint8_t)(sid >> 16), (uint8_t)(sid >> 8),
                    (uint8_t)sid};
    buf_put(&c->out, h, 9);
    mark_dirty(c);
}

static void put_u32(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
}

static uint32_t get_u32(const uint8_t *p) {
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static void window_update(conn_t *c, uint32_t sid, uint32_t inc) {
    uint8_t p[4];
    put_u32(p, inc);
    frame(c, 4, F_WINDOW, 0, sid);
    buf_put(&c->out, p, 4);
}

/* HPACK, encoding only: indexed static entries and literals without indexing, no Huffman. */
static void hpack_int(buf_t *b, uint8_t first, int prefix_bits, size_t v) {
    size_t max = ((size_t)1 << prefix_bits) - 1;
    if (v < max) {
        uint8_t x = (uint8_t)(first | v);
        buf_put(b, &x, 1);
        return;
    }
    uint8_t x = (uint8_t)(first | max);
    buf_put(b, &x, 1);
    v -= max;
    while (v >= 128) {
        x = (uint8_t)(v % 128 + 128);
        buf_put(b, &x, 1);
        v /= 128;
    }
    x = (uint8_t)v;
    buf_put(b, &x, 1);
}

static void hpack_literal(buf_t *b, int name_index, const char *name, const char *value) {
    if (name_index) {
        hpack_int(b, 0x00, 4, (size_t)name_index); /* literal without indexing, indexed name */
    } else {
        hpack_int(b, 0x00, 4, 0);
        hpack_int(b, 0x00, 7, strlen(name));
        buf_put(b, name, strlen(name));
    }
    hpack_int(b, 0x00, 7, strlen(value));
    buf_put(b, value, strlen(value));
}

static buf_t block_chat, block_create;

static void header_block(buf_t *b, const char *path) {
    uint8_t method_post = 0x83, scheme_http = 0x86; /* static table entries 3 and 6 */
    buf_put(b, &method_post, 1);
    buf_put(b, &scheme_http, 1);
    hpack_literal(b, 4, NULL, path);            /* :path */
    hpack_literal(b, 1, NULL, cfg.authority);   /* :authority */
    hpack_literal(b, 31, NULL, "application/grpc"); /* content-type */
    hpack_literal(b, 0, "te", "trailers");
}

static void flush_stream(stream_t *s) {
    conn_t *c = s->c;
    while (s->out.len > s->out.off) {
        int64_t n = (int64_t)(s->out.len - s->out.off);
        if (n > s->send_window) n = s->send_window;
        if (n > c->send_window) n = c->send_window;
        if (n > (int64_t)c->peer_max_frame) n = c->peer_max_frame;
        if (n <= 0) {
            if (!s->blocked) {
                s->blocked = 1;
                c->blocked++;
            }
            return;
        }
        int last = s->out.off + (size_t)n == s->out.len;
        frame(c, (uint32_t)n, F_DATA, last && s->end_after_out ? END_STREAM : 0, s->id);
        buf_put(&c->out, s->out.p + s->out.off, (size_t)n);
        s->out.off += (size_t)n;
        s->send_window -= n;
        c->send_window -= n;
    }
    s->out.len = s->out.off = 0;
    if (s->blocked) {
        s->blocked = 0;
        c->blocked--;
    }
}

/* Queue one gRPC message (uncompressed) on the stream. */
static void send_message(stream_t *s, const buf_t *pb) {
    uint8_t prefix[5] = {0};
    put_u32(prefix + 1, (uint32_t)pb->len);
    buf_compact(&s->out);
    buf_put(&s->out, prefix, 5);
    buf_put(&s->out, pb->p, pb->len);
    if (s->id) flush_stream(s);
}

static void open_now(stream_t *s) {
    conn_t *c = s->c;
    s->id = c->next_id;
    c->next_id += 2;
    size_t slot = (s->id - 1) / 2;
    if (slot >= c->by_id_cap) {
        size_t cap = c->by_id_cap ? c->by_id_cap * 2 : 256;
        while (cap <= slot) cap *= 2;
        c->by_id = realloc(c->by_id, cap * sizeof *c->by_id);
        if (!c->by_id) die("out of memory");
        memset(c->by_id + c->by_id_cap, 0, (cap - c->by_id_cap) * sizeof *c->by_id);
        c->by_id_cap = cap;
    }
    c->by_id[slot] = s;
    c->open_streams++;
    s->send_window = c->peer_initial_window;
    const buf_t *block = s->kind == K_CHAT ? &block_chat : &block_create;
    frame(c, (uint32_t)block->len, F_HEADERS, END_HEADERS, s->id);
    buf_put(&c->out, block->p, block->len);
    flush_stream(s);
}

/* Open when the connection has a free stream slot, else queue. */
static void open_stream(stream_t *s) {
    conn_t *c = s->c;
    if (c->dead) {
        fail(s, "connection lost");
        return;
    }
    if (c->queue_len == c->queue_head && (uint32_t)c->open_streams < c->peer_max_streams) {
        open_now(s);
        return;
    }
    if (c->queue_len == c->queue_cap) {
        c->queue_cap = c->queue_cap ? c->queue_cap * 2 : 256;
        c->queue = realloc(c->queue, c->queue_cap * sizeof *c->queue);
        if (!c->queue) die("out of memory");
    }
    c->queue[c->queue_len++] = s;
}

static void admit(conn_t *c) {
    while (c->queue_head < c->queue_len && (uint32_t)c->open_streams < c->peer_max_streams)
        open_now(c->queue[c->queue_head++]);
}

static void stream_closed(stream_t *s) {
    if (s->closed) return;
    s->closed = 1;
    if (s->id) {
        conn_t *c = s->c;
        c->by_id[(s->id - 1) / 2] = NULL;
        c->open_streams--;
        if (s->blocked) {
            s->blocked = 0;
            c->blocked--;
        }
        admit(c);
    }
}

/* -- the scenarios' requests ---------------------------------------------------------------- */

static buf_t scratch;

static void send_ping(stream_t *s) {
    scratch.len = 0;
    pb_enum(&scratch, cfg.f_req_type, cfg.v_req_ping);
    pb_string(&scratch, cfg.f_req_session, s->session, s->session_len);
    char rid[32];
    int n = snprintf(rid, sizeof rid, "p%ld", ++s->rid);
    pb_string(&scratch, cfg.f_req_request_id, rid, (size_t)n);
    send_message(s, &scratch);
}

static void send_text(stream_t *s) {
    scratch.len = 0;
    pb_string(&scratch, cfg.f_req_session, s->session, s->session_len);
    pb_string(&scratch, cfg.f_req_message, cfg.text, strlen(cfg.text));
    char rid[32];
    int n = snprintf(rid, sizeof rid, "m%ld", ++s->rid);
    pb_string(&scratch, cfg.f_req_request_id, rid, (size_t)n);
    send_message(s, &scratch);
}

static int is_scenario(const char *name) { return !strcmp(cfg.scenario, name); }

static int needs_session(void) { return !is_scenario("idle"); }

static void settle(stream_t *s, enum state st) {
    if (s->state != S_DONE && s->state != S_FAILED) settled_count++;
    s->state = st;
}

static void fail(stream_t *s, const char *why) {
    if (s->kind == K_CREATE) {
        stream_t *chat = &chats[s->index];
        stream_closed(s);
        fail(chat, why);
        return;
    }
    if (s->state == S_FAILED) return;
    int in_setup = s->state < S_READY;
    if (in_setup) ready_count++; /* setup is over for it, one way or another */
    s->why = why;
    if (failures_n < 5) {
        snprintf(failures[failures_n], sizeof failures[0], "stream %d: %s", s->index, why);
    }
    failures_n++;
    settle(s, S_FAILED);
    if (in_setup) start_setups();
}

static void chat_opened(stream_t *s) {
    /* A stream is open on the server once it has answered one PING. */
    s->state = S_OPENING;
    open_stream(s);
    send_ping(s);
}

static void on_setup_done(stream_t *s) {
    if ((is_scenario("throughput") || is_scenario("relay")) && cfg.warm &&
        s->state == S_OPENING) {
        s->state = S_WARMING;
        send_text(s);
        return;
    }
    s->state = S_READY;
    ready_count++;
    start_setups();
}

static void start_next(stream_t *s);

/*
 * Set up streams (CreateSession, then the Chat stream, open once it answered a PING) at most
 * setup_concurrency at a time: behind nginx every call is a new connection to a replica, and
 * a burst of them overflows the replica's listen backlog (grpclib's is 100), which nginx
 * answers with 502s. The setup is not measured, so it need not be a burst.
 */
static buf_t create_request;
static stream_t *creates_pool;
static int setups_started;

static void start_setups(void) {
    while (setups_started < cfg.streams &&
           setups_started - ready_count < cfg.setup_concurrency) {
        int i = setups_started++;
        if (needs_session()) {
            stream_t *u = &creates_pool[i];
            u->c = chats[i].c;
            u->index = i;
            u->kind = K_CREATE;
            u->end_after_out = 1;
            send_message(u, &create_request);
            open_stream(u);
        } else {
            chat_opened(&chats[i]);
        }
    }
}

static void on_chat_message(stream_t *s, int type) {
    double t = now();
    if (measuring && t <= t_end) {
        messages_in++;
    }
    if (type == cfg.v_error) {
        /* The one field decoded besides `type`: what went wrong, for the report. */
        static char why[120];
        const uint8_t *text = NULL;
        size_t n = 0;
        pb_scan(s->msg.p, s->msg.len, -1, cfg.f_resp_error_message, &text, &n);
        snprintf(why, sizeof why, "ERROR event: %.*s", (int)(n > 90 ? 90 : n),
                 text ? (const char *)text : "");
        fail(s, why);
        return;
    }
    if (s->state == S_OPENING) {
        if (type == cfg.v_pong) on_setup_done(s);
        return;
    }
    if (s->state == S_WARMING) {
        if (type == cfg.v_complete) on_setup_done(s);
        return;
    }
    if (s->state != S_BUSY) return;
    if (is_scenario("throughput")) {
        if (type == cfg.v_chunk && t <= t_end) chunks_in_window++;
        if (type == cfg.v_complete) {
            if (t <= t_end) replies_in_window++;
            start_next(s);
        }
    } else if (is_scenario("paced")) {
        if (type == cfg.v_complete && s->answered < s->sent) {
            sample(&s_a, t - s->sent_at[s->answered]);
            s->answered++;
            if (s->answered == cfg.messages) settle(s, S_DONE);
        }
    } else if (is_scenario("probe")) {
        if (s->probe == P_WAIT_PONG && type == cfg.v_pong) {
            sample(&s_a, t - s->sent_at[0]);
            s->probe = P_PAUSE_MESSAGE;
            s->next_at = t + cfg.gap;
        } else if (s->probe == P_WAIT_REPLY && type == cfg.v_chunk) {
            if (s->chunks_in_reply++ == 0) sample(&s_b, t - s->sent_at[0]);
        } else if (s->probe == P_WAIT_REPLY && type == cfg.v_complete) {
            s->probe = P_PAUSE_PING;
            s->next_at = t + cfg.gap;
        }
    } else if (is_scenario("idle")) {
        if (type == cfg.v_pong) {
            s->answered++;
            settle(s, S_DONE);
        }
    } else if (is_scenario("relay")) {
        if (type == cfg.v_chunk) {
            if (s->chunks_in_reply++ == 0)
                sample(&s_a, t - s->sent_at[0]);
            else
                sample(&s_b, t - s->last_chunk);
            s->last_chunk = t;
        } else if (type == cfg.v_complete) {
            s->answered++;
            replies_in_window++;
            chunks_in_window += s->chunks_in_reply;
            start_next(s);
        }
    }
}

/* throughput and relay: the stream's next message, or its end. */
static void start_next(stream_t *s) {
    double t = now();
    if (is_scenario("throughput") ? t >= t_end : s->answered >= cfg.messages) {
        settle(s, S_DONE);
        return;
    }
    s->chunks_in_reply = 0;
    s->sent_at[0] = t;
    s->sent++;
    send_text(s);
}

static void on_create_message(stream_t *s) {
    stream_t *chat = &chats[s->index];
    const uint8_t *sid = NULL;
    size_t n = 0;
    pb_scan(s->msg.p, s->msg.len, -1, cfg.f_create_resp_session, &sid, &n);
    if (!sid || n == 0 || n >= sizeof chat->session) {
        fail(s, "CreateSession answered without a session id");
        return;
    }
    memcpy(chat->session, sid, n);
    chat->session_len = n;
}

static void on_stream_end(stream_t *s) {
    stream_closed(s);
    if (s->kind == K_CREATE) {
        stream_t *chat = &chats[s->index];
        if (chat->session_len) {
            chat_opened(chat);
        } else {
            fail(chat, "CreateSession failed (no message before the end of its stream)");
        }
        return;
    }
    if (s->state != S_DONE && s->state != S_FAILED) fail(s, "the server ended the stream");
}

/* -- reading frames --------------------------------------------------------------------------- */

static void on_data(stream_t *s, const uint8_t *p, size_t n) {
    while (n > 0) {
        if (s->head_have < 5) {
            size_t k = 5 - (size_t)s->head_have;
            if (k > n) k = n;
            memcpy(s->head + s->head_have, p, k);
            s->head_have += (int)k;
            p += k;
            n -= k;
            if (s->head_have < 5) return;
            s->msg_len = get_u32(s->head + 1);
            s->msg.len = 0;
            if (s->head[0] != 0) {
                fail(s, "a compressed message (none was asked for)");
                return;
            }
        }
        size_t want = s->msg_len - s->msg.len;
        size_t k = want < n ? want : n;
        buf_put(&s->msg, p, k);
        p += k;
        n -= k;
        if (s->msg.len == s->msg_len) {
            s->head_have = 0;
            if (s->kind == K_CREATE) {
                on_create_message(s);
            } else {
                on_chat_message(s, pb_scan(s->msg.p, s->msg.len, cfg.f_resp_type, 0, NULL, NULL));
            }
            if (s->state == S_FAILED) return;
        }
    }
}

static void conn_lost(conn_t *c, const char *why) {
    if (c->dead) return;
    c->dead = 1;
    epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    for (size_t i = 0; i < c->by_id_cap; i++) {
        stream_t *s = c->by_id[i];
        if (s) {
            c->by_id[i] = NULL;
            s->closed = 1;
            fail(s, why);
        }
    }
    for (size_t i = c->queue_head; i < c->queue_len; i++) fail(c->queue[i], why);
    c->queue_head = c->queue_len;
}

/*
 * The :status of a response header block when it is plainly not 200, else NULL. Only the
 * encodings a server uses for the first header are looked at: the static table's
 * ":status: 200" (0x88) means 200; a literal with the :status name (index 8) and a plain
 * (not Huffman-coded) value is read. Anything else is not judged.
 */
static const char *http_status(const uint8_t *p, uint32_t len, uint8_t flags) {
    static char status[8];
    if (flags & PADDED) {
        if (len < 1) return NULL;
        p++, len--;
    }
    if (flags & PRIORITY_FLAG) {
        if (len < 5) return NULL;
        p += 5, len -= 5;
    }
    if (len < 1 || p[0] == 0x88) return NULL;
    int literal = p[0] == 0x48 || p[0] == 0x08 || p[0] == 0x18; /* name: static index 8 */
    if (!literal || len < 5 || (p[1] & 0x80) || p[1] != 3) return NULL;
    memcpy(status, p + 2, 3);
    status[3] = 0;
    return strcmp(status, "200") ? status : NULL;
}

static stream_t *lookup(conn_t *c, uint32_t sid) {
    if (sid == 0 || !(sid & 1)) return NULL;
    size_t slot = (sid - 1) / 2;
    return slot < c->by_id_cap ? c->by_id[slot] : NULL;
}

static void on_frame(conn_t *c, uint8_t type, uint8_t flags, uint32_t sid, const uint8_t *p,
                     uint32_t len) {
    if (c->continuation && type != F_CONTINUATION) {
        conn_lost(c, "protocol error: a header block was interrupted");
        return;
    }
    switch (type) {
    case F_DATA: {
        c->recv_unacked += len;
        if (c->recv_unacked >= REPLENISH) {
            window_update(c, 0, (uint32_t)c->recv_unacked);
            c->recv_unacked = 0;
        }
        stream_t *s = lookup(c, sid);
        if (!s) return;
        s->recv_unacked += len;
        if (s->recv_unacked >= REPLENISH && !(flags & END_STREAM)) {
            window_update(c, sid, (uint32_t)s->recv_unacked);
            s->recv_unacked = 0;
        }
        uint32_t pad = 0;
        if (flags & PADDED) {
            if (len < 1 || p[0] >= len) return;
            pad = p[0];
            p++;
            len--;
        }
        on_data(s, p, len - pad);
        if ((flags & END_STREAM) && !s->closed) on_stream_end(s);
        return;
    }
    case F_HEADERS: {
        /* Response headers or trailers; never decoded (see the top of this file), but for
         * a proxy's HTTP error (nginx answers 502 when a replica refuses a connection). */
        stream_t *s = lookup(c, sid);
        if (s && !s->headers_seen) {
            s->headers_seen = 1;
            const char *status = http_status(p, len, flags);
            if (status) {
                static char why[64];
                snprintf(why, sizeof why, "HTTP status %s (not a gRPC answer)", status);
                stream_closed(s);
                fail(s, why);
                return;
            }
        }
        if (!(flags & END_HEADERS)) {
            c->continuation = sid;
            c->continuation_ends = flags & END_STREAM;
            return;
        }
        if ((flags & END_STREAM) && s) on_stream_end(s);
        return;
    }
    case F_CONTINUATION:
        if (flags & END_HEADERS) {
            uint32_t on = c->continuation;
            int ends = c->continuation_ends;
            c->continuation = 0;
            if (ends) {
                stream_t *s = lookup(c, on);
                if (s) on_stream_end(s);
            }
        }
        return;
    case F_RST: {
        stream_t *s = lookup(c, sid);
        if (s) {
            stream_closed(s);
            static char why[64];
            snprintf(why, sizeof why, "stream reset by the server (code %u)",
                     len >= 4 ? get_u32(p) : 0);
            fail(s, why);
        }
        return;
    }
    case F_SETTINGS:
        if (flags & ACK) return;
        for (uint32_t i = 0; i + 6 <= len; i += 6) {
            uint16_t id = (uint16_t)(p[i] << 8 | p[i + 1]);
            uint32_t v = get_u32(p + i + 2);
            if (id == 3) {
                c->peer_max_streams = v;
            } else if (id == 4) {
                int64_t delta = (int64_t)v - c->peer_initial_window;
                c->peer_initial_window = v;
                for (size_t k = 0; k < c->by_id_cap; k++)
                    if (c->by_id[k]) c->by_id[k]->send_window += delta;
            } else if (id == 5) {
                c->peer_max_frame = v;
            }
        }
        frame(c, 0, F_SETTINGS, ACK, 0);
        for (size_t k = 0; c->blocked && k < c->by_id_cap; k++)
            if (c->by_id[k] && c->by_id[k]->blocked) flush_stream(c->by_id[k]);
        admit(c);
        return;
    case F_PING:
        if (!(flags & ACK) && len == 8) {
            frame(c, 8, F_PING, ACK, 0);
            buf_put(&c->out, p, 8);
        }
        return;
    case F_GOAWAY:
        conn_lost(c, "the server sent GOAWAY");
        return;
    case F_WINDOW: {
        if (len < 4) return;
        uint32_t inc = get_u32(p) & 0x7fffffff;
        if (sid == 0) {
            c->send_window += inc;
            for (size_t k = 0; c->blocked && k < c->by_id_cap; k++)
                if (c->by_id[k] && c->by_id[k]->blocked) flush_stream(c->by_id[k]);
        } else {
            stream_t *s = lookup(c, sid);
            if (s) {
                s->send_window += inc;
                if (s->blocked) flush_stream(s);
            }
        }
        return;
    }
    default:
        return; /* PRIORITY and unknown frames */
    }
}

static void on_readable(conn_t *c) {
    for (;;) {
        buf_reserve(&c->in, 65536);
        ssize_t n = read(c->fd, c->in.p + c->in.len, c->in.cap - c->in.len);
        if (n < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK) break;
            if (errno == EINTR) continue;
            conn_lost(c, "connection error");
            return;
        }
        if (n == 0) {
            conn_lost(c, "the server closed the connection");
            return;
        }
        c->in.len += (size_t)n;
        while (c->in.len - c->in.off >= 9) {
            const uint8_t *h = c->in.p + c->in.off;
            uint32_t len = (uint32_t)h[0] << 16 | (uint32_t)h[1] << 8 | h[2];
            if (c->in.len - c->in.off < 9 + (size_t)len) break;
            c->in.off += 9 + len;
            on_frame(c, h[3], h[4], get_u32(h + 5) & 0x7fffffff, h + 9, len);
            if (c->dead) return;
        }
        buf_compact(&c->in);
        if ((size_t)n < 65536) break; /* the socket is most likely drained */
    }
}

static void flush_conn(conn_t *c) {
    while (c->out.len > c->out.off) {
        ssize_t n = write(c->fd, c->out.p + c->out.off, c->out.len - c->out.off);
        if (n < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                if (!c->want_out) {
                    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT, .data.ptr = c};
                    epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev);
                    c->want_out = 1;
                }
                return;
            }
            conn_lost(c, "connection error while writing");
            return;
        }
        c->out.off += (size_t)n;
    }
    c->out.len = c->out.off = 0;
    if (c->want_out) {
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
        epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev);
        c->want_out = 0;
    }
}

static void flush_all(void) {
    while (dirty_head) {
        conn_t *c = dirty_head;
        dirty_head = c->next_dirty;
        c->dirty = 0;
        if (!c->dead) flush_conn(c);
    }
}

static void connect_all(void) {
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM}, *ai;
    int rc = getaddrinfo(cfg.host, cfg.port, &hints, &ai);
    if (rc) die("cannot resolve %s: %s", cfg.host, gai_strerror(rc));
    for (int i = 0; i < n_conns; i++) {
        conn_t *c = &conns[i];
        c->index = i;
        c->fd = socket(ai->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (c->fd < 0) die("socket: %s", strerror(errno));
        int one = 1;
        setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        /* A blocking connect (loopback: at once), then non-blocking I/O. */
        if (connect(c->fd, ai->ai_addr, ai->ai_addrlen) < 0)
            die("cannot connect to %s:%s: %s", cfg.host, cfg.port, strerror(errno));
        fcntl(c->fd, F_SETFL, fcntl(c->fd, F_GETFL) | O_NONBLOCK);
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
        epoll_ctl(epfd, EPOLL_CTL_ADD, c->fd, &ev);
        c->next_id = 1;
        c->send_window = 65535;
        c->peer_initial_window = 65535;
        c->peer_max_frame = 16384;
        c->peer_max_streams = 100; /* until its SETTINGS say: grpclib's (h2's) default */
        static const char preface[] = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
        buf_put(&c->out, preface, sizeof preface - 1);
        uint8_t settings[12];
        settings[0] = 0, settings[1] = 2, put_u32(settings + 2, 0); /* ENABLE_PUSH 0 */
        settings[6] = 0, settings[7] = 4, put_u32(settings + 8, OUR_WINDOW);
        frame(c, sizeof settings, F_SETTINGS, 0, 0);
        buf_put(&c->out, settings, sizeof settings);
        window_update(c, 0, OUR_WINDOW - 65535);
    }
    freeaddrinfo(ai);
}

/* -- the run ------------------------------------------------------------------------------------ */

static int stdin_line(char *line, size_t size) {
    /* A line from stdin: 1, or 0 at EOF, -1 while only part of a line has come. */
    static char pending[256];
    static size_t have;
    char *nl = memchr(pending, '\n', have);
    if (!nl) {
        ssize_t n = read(0, pending + have, sizeof pending - have);
        if (n < 0 && (errno == EAGAIN || errno == EINTR)) return -1;
        if (n <= 0) return 0;
        have += (size_t)n;
        nl = memchr(pending, '\n', have);
        if (!nl) {
            if (have == sizeof pending) return 0; /* not a command */
            return -1;
        }
    }
    size_t n = (size_t)(nl - pending);
    size_t k = n < size ? n : size - 1;
    memcpy(line, pending, k);
    line[k] = 0;
    have -= n + 1;
    memmove(pending, nl + 1, have);
    return 1;
}

static void print_samples(FILE *f, const char *name, const samples_t *s) {
    fprintf(f, "\"%s\": [", name);
    for (size_t i = 0; i < s->n; i++) fprintf(f, i ? ",%.6f" : "%.6f", s->v[i]);
    fputs("]", f);
}

static void json_string(FILE *f, const char *text) {
    fputc('"', f);
    for (const unsigned char *c = (const unsigned char *)text; *c; c++) {
        if (*c == '"' || *c == '\\')
            fprintf(f, "\\%c", *c);
        else if (*c < 0x20)
            fprintf(f, "\\u%04x", *c);
        else
            fputc(*c, f);
    }
    fputc('"', f);
}

static void print_failures(FILE *f) {
    fputs("\"failures\": [", f);
    for (int i = 0; i < failures_n && i < 5; i++) {
        if (i) fputc(',', f);
        json_string(f, failures[i]);
    }
    fprintf(f, "], \"failed_streams\": %d", failures_n);
}

static int count_answered(void) {
    int answered = 0;
    for (int i = 0; i < cfg.streams; i++) answered += chats[i].answered;
    return answered;
}

static void report(double cpu) {
    FILE *f = stdout;
    fprintf(f, "{\"client_cpu_s\": %.6f, \"messages\": %lld, \"seconds\": %.6f, ", cpu,
            messages_in, t_stop - t_go);
    if (is_scenario("throughput")) {
        fprintf(f, "\"chunks\": %lld, \"replies\": %lld, ", chunks_in_window, replies_in_window);
    } else if (is_scenario("paced")) {
        int unanswered = 0, starved = 0;
        for (int i = 0; i < cfg.streams; i++) {
            int missing = cfg.messages - chats[i].answered;
            unanswered += missing;
            starved += missing > 0 || chats[i].state == S_FAILED;
        }
        fprintf(f, "\"expected\": %d, \"unanswered\": %d, \"starved_streams\": %d, ",
                cfg.streams * cfg.messages, unanswered, starved);
        print_samples(f, "answers", &s_a);
        fputs(", ", f);
    } else if (is_scenario("probe")) {
        print_samples(f, "ping", &s_a);
        fputs(", ", f);
        print_samples(f, "first_chunk", &s_b);
        fputs(", ", f);
    } else if (is_scenario("idle")) {
        fprintf(f, "\"opened\": %d, \"answered\": %d, ", opened_count, count_answered());
    } else if (is_scenario("relay")) {
        fprintf(f, "\"chunks\": %lld, \"replies\": %lld, ", chunks_in_window, replies_in_window);
        print_samples(f, "ttft", &s_a);
        fputs(", ", f);
        print_samples(f, "itl", &s_b);
        fputs(", ", f);
    }
    print_failures(f);
    fputs("}\n", f);
    fflush(f);
}

static void go(void) {
    running = measuring = 1;
    t_go = now();
    settled_count = 0;
    if (is_scenario("throughput") || is_scenario("probe")) {
        t_end = t_go + cfg.duration;
    } else if (is_scenario("paced")) {
        t_end = t_go + (cfg.messages - 1) * cfg.interval + cfg.interval + cfg.grace;
    } else {
        t_end = t_go + (is_scenario("idle") ? cfg.setup_timeout : cfg.duration);
    }
    for (int i = 0; i < cfg.streams; i++) {
        stream_t *s = &chats[i];
        if (s->state == S_FAILED) {
            settled_count++;
            continue;
        }
        s->answered = s->sent = 0;
        if (is_scenario("relay") && cfg.stagger > 0) {
            s->state = S_BUSY; /* its first message on its schedule, see tick() */
        } else if (is_scenario("throughput") || is_scenario("relay")) {
            s->state = S_BUSY;
            start_next(s);
        } else if (is_scenario("idle")) {
            s->state = S_BUSY;
            send_ping(s);
        } else if (is_scenario("probe")) {
            s->state = S_BUSY;
            s->probe = P_WAIT_PONG;
            s->sent_at[0] = t_go;
            send_ping(s);
        } else {
            s->state = S_BUSY; /* paced: on its schedule, see tick() */
        }
    }
}

/* Timed work; returns seconds until it next has something to do. */
static int paced_k, paced_i, relay_i;

static double tick(double t) {
    if (is_scenario("paced")) {
        while (paced_k < cfg.messages) {
            double due =
                t_go + paced_k * cfg.interval + cfg.interval * paced_i / (double)cfg.streams;
            if (due > t) return due - t;
            stream_t *s = &chats[paced_i];
            if (s->state == S_BUSY) {
                s->sent_at[s->sent++] = t;
                send_text(s);
            }
            if (++paced_i == cfg.streams) {
                paced_i = 0;
                paced_k++;
            }
        }
        return t_end - t;
    }
    if (is_scenario("probe")) {
        stream_t *s = &chats[0];
        if (s->state != S_BUSY || s->probe == P_WAIT_PONG || s->probe == P_WAIT_REPLY)
            return 1.0;
        if (s->next_at > t) return s->next_at - t;
        /* The pause after an answer is over: a MESSAGE after a PONG, a PING after a reply. */
        if (t >= t_end || (int)s_a.n >= cfg.max_samples) {
            settle(s, S_DONE);
            return 1.0;
        }
        s->sent_at[0] = t;
        if (s->probe == P_PAUSE_MESSAGE) {
            s->probe = P_WAIT_REPLY;
            s->chunks_in_reply = 0;
            send_text(s);
        } else {
            s->probe = P_WAIT_PONG;
            send_ping(s);
        }
        return 1.0;
    }
    if (is_scenario("relay") && cfg.stagger > 0) {
        /* Stream i starts at stagger * i / streams: a steady arrival of requests rather
         * than a burst of them at "go". */
        while (relay_i < cfg.streams) {
            double due = t_go + cfg.stagger * relay_i / (double)cfg.streams;
            if (due > t) return due - t;
            stream_t *s = &chats[relay_i++];
            if (s->state == S_BUSY) start_next(s);
        }
    }
    return t_end > t ? t_end - t : 1.0;
}

int main(int argc, char **argv) {
    parse_args(argc, argv);
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    header_block(&block_chat, cfg.path_chat);
    header_block(&block_create, cfg.path_create);
    epfd = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL};
    epoll_ctl(epfd, EPOLL_CTL_ADD, 0, &ev);
    fcntl(0, F_SETFL, fcntl(0, F_GETFL) | O_NONBLOCK);

    n_conns = (cfg.streams + cfg.per_conn - 1) / cfg.per_conn;
    conns = calloc((size_t)n_conns, sizeof *conns);
    chats = calloc((size_t)cfg.streams, sizeof *chats);
    stream_t *creates = calloc((size_t)cfg.streams, sizeof *creates);
    if (!conns || !chats || !creates) die("out of memory");
    connect_all();
    int slots = cfg.messages > 2 ? cfg.messages : 2;
    for (int i = 0; i < cfg.streams; i++) {
        stream_t *s = &chats[i];
        s->c = &conns[i / cfg.per_conn];
        s->index = i;
        s->kind = K_CHAT;
        s->sent_at = calloc((size_t)slots, sizeof(double));
        if (!s->sent_at) die("out of memory");
    }
    /* Set up: a session per stream (CreateSession), then the Chat stream, open on the server
     * once it answered a PING. */
    pb_string(&create_request, cfg.f_create_title, "bench", 5);
    creates_pool = creates;
    start_setups();
    double setup_deadline = now() + cfg.setup_timeout;
    int said_ready = 0, said_result = 0, holding = 0, stdin_open = 1, go_said = 0;
    double cpu_start = 0, cpu_used = 0;
    struct epoll_event events[256];
    for (;;) {
        double t = now(), wait = 1.0;
        if (!said_ready) {
            if (ready_count >= cfg.streams || t >= setup_deadline) {
                for (int i = 0; i < cfg.streams; i++) {
                    if (chats[i].state < S_READY) fail(&chats[i], "not set up in time");
                    opened_count += chats[i].state == S_READY;
                }
                fputs("ready\n", stdout);
                fflush(stdout);
                said_ready = 1;
            } else {
                wait = setup_deadline - t;
            }
        }
        if (said_ready && go_said && !running) {
            go();
            cpu_start = cpu_seconds();
            continue; /* send what go() queued before waiting */
        }
        if (running && !said_result) {
            wait = tick(t);
            if (measuring && (t >= t_end || settled_count >= cfg.streams)) {
                /* The measurement window is over (throughput: replies in flight may end). */
                cpu_used = cpu_seconds() - cpu_start;
                t_stop = t < t_end ? t : t_end;
                measuring = 0;
            }
            if (measuring && t_end - t < wait) wait = t_end - t;
            int over = !measuring && (settled_count >= cfg.streams ||
                                      !is_scenario("throughput") || t >= t_end + cfg.drain);
            if (over) {
                report(cpu_used);
                said_result = 1;
                if (!is_scenario("idle")) break;
                fputs("holding\n", stdout);
                fflush(stdout);
                holding = 1;
            }
        }
        if (wait < 0) wait = 0;
        if (wait > 1.0) wait = 1.0;
        flush_all(); /* one write per connection for everything this pass queued */
        int n = epoll_wait(epfd, events, 256, (int)(wait * 1000.0 + 0.999));
        if (n < 0 && errno != EINTR) die("epoll_wait: %s", strerror(errno));
        for (int i = 0; i < n; i++) {
            conn_t *c = events[i].data.ptr;
            if (c) {
                if (c->dead) continue;
                if (events[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR)) on_readable(c);
                if (!c->dead && (events[i].events & EPOLLOUT)) flush_conn(c);
                continue;
            }
            char line[64];
            int got;
            while (stdin_open && (got = stdin_line(line, sizeof line)) != -1) {
                if (got == 0) {
                    /* EOF: the driver is gone; a run under way still ends on its own. */
                    if (holding || !running) goto out;
                    epoll_ctl(epfd, EPOLL_CTL_DEL, 0, NULL);
                    stdin_open = 0;
                } else if (!strcmp(line, "go")) {
                    go_said = 1; /* acted on once the setup is over */
                } else if (!strcmp(line, "stop")) {
                    goto out;
                }
            }
        }
    }
out:
    for (int i = 0; i < n_conns; i++)
        if (!conns[i].dead) close(conns[i].fd);
    return 0;
}
