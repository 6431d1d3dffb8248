/*
 * _mpshttp.c - mps.http._speedups: the WSGI layer's per-request work in C.
 *
 * Three pure functions of their arguments, no I/O and no state of their own,
 *
 *   valid(status, headers) -> bool
 *       What start_response must refuse, checked (False: the Python check in
 *       mps/http/wsgi.py runs and raises with its message).
 *   head(status, code, headers, known_length, is_head, http11, keep, date)
 *       -> (head, length, keep, chunked, body_allowed)
 *       The response's status line and header fields, framing decided: the
 *       app's Content-Length checked (ValueError), hop-by-hop fields dropped,
 *       our Date and Server unless the app gave its own.  For headers that
 *       valid() accepted.
 *   environ(base, method, target, version, headers, keys, extra, input) -> dict
 *       A copy of ``base`` with the request's CGI keys and HTTP_* fields, the
 *       connection's (``extra``: key, value, key, value...) and wsgi.input.
 *
 * two types for parsing, driven by httptools (llhttp):
 *
 *   Sink(request_line, fields, field_size, max_body, opened, ready)
 *       The parser's on_* callbacks: each request's head checked against
 *       the limits as it is parsed (smuggling, codings, Host, versions).
 *   Request(started)
 *       One parsed request, as the rest of mps.http reads and updates it.
 *
 *   llhttp(path) -> bool, parse_lone(data, *limits) -> list | None
 *       The C loop's parse: httptools' llhttp called from C (see "llhttp,
 *       directly"), driving the same Sink.
 *
 * and the request path itself, for the common cases (see "respond" and "the
 * connection loop" below):
 *
 *   Responder(...).respond(conn, reader, req, peer, keep)
 *       A plain request's whole exchange with the app, handing anything
 *       else to the Python path at the point reached.
 *   Responder.serve_one(idle_first)
 *       One connection: accepted (the scoreboard's C accept) and, for one
 *       plain request without keep-alive, served start to close in C.
 *
 * mps/http/wsgi.py and message.py hold the Python versions of all of it
 * (used where this module is not built, or with MPS_NO_SPEEDUPS=1);
 * tests/test_speedups.py checks that both give the same answer for the same
 * input, hypothesis-generated, and the live suites run both.  Per request
 * these were the Python layer's costliest steps after the app itself (each
 * parser callback a Python frame); in C each is a fraction of a microsecond.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

/* Longest Content-Length the app may declare: 18 digits (below 2**63). */
#define MAX_LENGTH_DIGITS 18

/* ------------------------------------------------------------ helpers */

static int is_tchar(Py_UCS4 c)
{
    /* RFC 9110 5.6.2 token characters. */
    if (c >= 0x80)
        return 0;
    if ((c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z'))
        return 1;
    return c != 0 && strchr("!#$%&'*+-.^_`|~", (int)c) != NULL;
}

/* True when ``s`` holds none of CR, LF, NUL. */
static int sendable(PyObject *s)
{
    int kind = PyUnicode_KIND(s);
    const void *data = PyUnicode_DATA(s);
    Py_ssize_t n = PyUnicode_GET_LENGTH(s);
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_UCS4 c = PyUnicode_READ(kind, data, i);
        if (c == '\r' || c == '\n' || c == 0)
            return 0;
    }
    return 1;
}

static int valid_status(PyObject *status)
{
    if (!PyUnicode_Check(status) || PyUnicode_READY(status) < 0)
        return 0;
    Py_ssize_t n = PyUnicode_GET_LENGTH(status);
    if (n < 4)
        return 0;
    int kind = PyUnicode_KIND(status);
    const void *data = PyUnicode_DATA(status);
    Py_UCS4 a = PyUnicode_READ(kind, data, 0), b = PyUnicode_READ(kind, data, 1),
            c = PyUnicode_READ(kind, data, 2), sp = PyUnicode_READ(kind, data, 3);
    if (a < '1' || a > '9' || b < '0' || b > '9' || c < '0' || c > '9' || sp != ' ')
        return 0;
    return sendable(status);
}

static int valid_name(PyObject *name)
{
    if (PyUnicode_READY(name) < 0)
        return 0;
    Py_ssize_t n = PyUnicode_GET_LENGTH(name);
    int kind = PyUnicode_KIND(name);
    const void *data = PyUnicode_DATA(name);
    if (n == 0)
        return 0;
    for (Py_ssize_t i = 0; i < n; i++)
        if (!is_tchar(PyUnicode_READ(kind, data, i)))
            return 0;
    return 1;
}

/* The (name, value) pair at headers[i], or NULL (no exception set) when it is
 * not a 2-tuple of str. */
static int header_item(PyObject *item, PyObject **name, PyObject **value)
{
    if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 2)
        return 0;
    *name = PyTuple_GET_ITEM(item, 0);
    *value = PyTuple_GET_ITEM(item, 1);
    return PyUnicode_Check(*name) && PyUnicode_Check(*value)
        && PyUnicode_READY(*name) == 0 && PyUnicode_READY(*value) == 0;
}

/* ASCII case-insensitive: is the str ``s`` equal to the lowercase ``low``? */
static int name_is(PyObject *s, const char *low, Py_ssize_t len)
{
    if (PyUnicode_GET_LENGTH(s) != len || PyUnicode_KIND(s) != PyUnicode_1BYTE_KIND)
        return 0;
    const Py_UCS1 *d = PyUnicode_1BYTE_DATA(s);
    for (Py_ssize_t i = 0; i < len; i++) {
        Py_UCS1 c = d[i];
        if (c >= 'A' && c <= 'Z')
            c = (Py_UCS1)(c + 32);
        if (c != (Py_UCS1)low[i])
            return 0;
    }
    return 1;
}

#define NAME_IS(s, lit) name_is((s), (lit), (Py_ssize_t)(sizeof(lit) - 1))

/* Does the str ``s`` contain "close", ASCII case-insensitively? */
static int says_close(PyObject *s)
{
    Py_ssize_t n = PyUnicode_GET_LENGTH(s);
    int kind = PyUnicode_KIND(s);
    const void *data = PyUnicode_DATA(s);
    static const char word[] = "close";
    for (Py_ssize_t i = 0; i + 5 <= n; i++) {
        Py_ssize_t j = 0;
        for (; j < 5; j++) {
            Py_UCS4 c = PyUnicode_READ(kind, data, i + j);
            if (c >= 'A' && c <= 'Z')
                c += 32;
            if (c != (Py_UCS4)word[j])
                break;
        }
        if (j == 5)
            return 1;
    }
    return 0;
}

/* A growing byte buffer for the head: on the stack for the usual size. */
struct out {
    char *p;
    Py_ssize_t len, cap;
    char local[1024];
};

static int out_put(struct out *o, const char *s, Py_ssize_t n)
{
    if (o->len + n > o->cap) {
        Py_ssize_t cap = (o->len + n) * 2;
        char *grown = PyMem_Malloc((size_t)cap);
        if (grown == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        memcpy(grown, o->p, (size_t)o->len);
        if (o->p != o->local)
            PyMem_Free(o->p);
        o->p = grown;
        o->cap = cap;
    }
    memcpy(o->p + o->len, s, (size_t)n);
    o->len += n;
    return 0;
}

#define OUT_LIT(o, lit) out_put((o), (lit), (Py_ssize_t)(sizeof(lit) - 1))

/* A str as latin-1 bytes into the buffer; UnicodeEncodeError (as
 * str.encode("latin-1") raises) when it has a character beyond U+00FF. */
static int out_latin1(struct out *o, PyObject *s)
{
    if (PyUnicode_KIND(s) == PyUnicode_1BYTE_KIND)
        return out_put(o, (const char *)PyUnicode_1BYTE_DATA(s), PyUnicode_GET_LENGTH(s));
    PyObject *encoded = PyUnicode_AsLatin1String(s);     /* raises the error */
    if (encoded == NULL)
        return -1;
    int rc = out_put(o, PyBytes_AS_STRING(encoded), PyBytes_GET_SIZE(encoded));
    Py_DECREF(encoded);
    return rc;
}

/* ------------------------------------------------------------ valid */

/* What start_response may accept: a status line and a list of (str, str)
 * fields that can be sent as they are. */
static int valid_start(PyObject *status, PyObject *headers)
{
    if (!valid_status(status) || !PyList_Check(headers))
        return 0;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(headers); i++) {
        PyObject *name, *value;
        if (!header_item(PyList_GET_ITEM(headers, i), &name, &value)
                || !valid_name(name) || !sendable(value))
            return 0;
    }
    return 1;
}

static PyObject *speedups_valid(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "valid(status, headers)");
        return NULL;
    }
    return PyBool_FromLong(valid_start(args[0], args[1]));
}

/* ------------------------------------------------------------ head */

static PyObject *speedups_head(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 8) {
        PyErr_SetString(PyExc_TypeError,
                        "head(status, code, headers, known_length, is_head, http11, keep, date)");
        return NULL;
    }
    PyObject *status = args[0], *headers = args[2], *date = args[7];
    long code = PyLong_AsLong(args[1]);
    if (code == -1 && PyErr_Occurred())
        return NULL;
    long long known_length = PyLong_AsLongLong(args[3]);
    if (known_length == -1 && PyErr_Occurred())
        return NULL;
    int is_head = PyObject_IsTrue(args[4]);
    int http11 = is_head < 0 ? -1 : PyObject_IsTrue(args[5]);
    int keep = http11 < 0 ? -1 : PyObject_IsTrue(args[6]);
    if (keep < 0)
        return NULL;
    if (!PyUnicode_Check(status) || !PyList_Check(headers) || !PyBytes_Check(date)) {
        PyErr_SetString(PyExc_TypeError, "head(): status str, headers list, date bytes");
        return NULL;
    }
    struct out o = {.p = o.local, .len = 0, .cap = sizeof o.local};
    long long length = -1;
    int own_date = 1, own_server = 1, chunked = 0;
    PyObject *result = NULL;

    if (OUT_LIT(&o, "HTTP/1.1 ") < 0 || out_latin1(&o, status) < 0 || OUT_LIT(&o, "\r\n") < 0)
        goto done;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(headers); i++) {
        PyObject *name, *value;
        if (!header_item(PyList_GET_ITEM(headers, i), &name, &value)) {
            PyErr_SetString(PyExc_TypeError, "head(): headers must be (str, str) tuples");
            goto done;
        }
        if (!valid_name(name) || !sendable(value)) {
            /* changed since start_response checked it: never sent */
            PyErr_Format(PyExc_ValueError, "header %R has a character that cannot be sent", name);
            goto done;
        }
        if (NAME_IS(name, "content-length")) {
            /* One, digits only (int() would also take "-5", "+5", "1_0"). */
            Py_ssize_t n = PyUnicode_GET_LENGTH(value);
            int digits = n > 0 && n <= MAX_LENGTH_DIGITS
                && PyUnicode_KIND(value) == PyUnicode_1BYTE_KIND && length < 0;
            long long parsed = 0;
            for (Py_ssize_t j = 0; digits && j < n; j++) {
                Py_UCS1 c = PyUnicode_1BYTE_DATA(value)[j];
                if (c < '0' || c > '9')
                    digits = 0;
                parsed = parsed * 10 + (c - '0');
            }
            if (!digits) {
                PyObject *msg = PyUnicode_FromFormat("Content-Length %R is not one length",
                                                     value);
                if (msg != NULL) {
                    PyErr_SetObject(PyExc_ValueError, msg);
                    Py_DECREF(msg);
                }
                goto done;
            }
            length = parsed;
        } else if (NAME_IS(name, "connection") || NAME_IS(name, "keep-alive")
                   || NAME_IS(name, "proxy-authenticate")
                   || NAME_IS(name, "proxy-authorization") || NAME_IS(name, "te")
                   || NAME_IS(name, "trailers") || NAME_IS(name, "transfer-encoding")
                   || NAME_IS(name, "upgrade")) {
            /* Hop-by-hop: the server frames the message itself. */
            if (NAME_IS(name, "connection") && says_close(value))
                keep = 0;
            continue;
        } else if (NAME_IS(name, "date")) {
            own_date = 0;       /* one Date only (RFC 9110 6.6.1) */
        } else if (NAME_IS(name, "server")) {
            own_server = 0;
        }
        if (out_latin1(&o, name) < 0 || OUT_LIT(&o, ": ") < 0 || out_latin1(&o, value) < 0
                || OUT_LIT(&o, "\r\n") < 0)
            goto done;
    }
    int no_body_code = code == 204 || code == 304;
    int body_allowed = !(no_body_code || code < 200 || is_head);
    if (length < 0 && !no_body_code && code >= 200) {
        if (known_length >= 0) {
            length = known_length;
            if (!is_head || known_length > 0) {
                char line[48];
                int n = snprintf(line, sizeof line, "Content-Length: %lld\r\n", known_length);
                if (out_put(&o, line, n) < 0)
                    goto done;
            }
        } else if (!body_allowed) {
            /* HEAD: no body, and no length we could know */
        } else if (http11) {
            chunked = 1;
            if (OUT_LIT(&o, "Transfer-Encoding: chunked\r\n") < 0)
                goto done;
        } else {
            keep = 0;           /* HTTP/1.0: the close delimits the body */
        }
    }
    if (!keep) {
        if (OUT_LIT(&o, "Connection: close\r\n") < 0)
            goto done;
    } else if (!http11) {
        if (OUT_LIT(&o, "Connection: keep-alive\r\n") < 0)
            goto done;
    }
    if (own_date && out_put(&o, PyBytes_AS_STRING(date), PyBytes_GET_SIZE(date)) < 0)
        goto done;
    if (own_server ? OUT_LIT(&o, "Server: mps\r\n\r\n") < 0 : OUT_LIT(&o, "\r\n") < 0)
        goto done;
    result = Py_BuildValue("(y#LNNN)", o.p, o.len, length, PyBool_FromLong(keep),
                           PyBool_FromLong(chunked), PyBool_FromLong(body_allowed));
done:
    if (o.p != o.local)
        PyMem_Free(o.p);
    return result;
}

/* ------------------------------------------------------------ environ */

static int hexval(unsigned char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

/* The str of latin-1 bytes [p, p+n), "%XX" decoded when ``unquote`` (as
 * urllib.parse.unquote_to_bytes: a "%" not followed by two hex digits stays). */
static PyObject *latin1_text(const char *p, Py_ssize_t n, int unquote)
{
    if (!unquote || memchr(p, '%', (size_t)n) == NULL)
        return PyUnicode_DecodeLatin1(p, n, NULL);
    char local[512] = {0};
    char *buf = n <= (Py_ssize_t)sizeof local ? local : PyMem_Malloc((size_t)n);
    if (buf == NULL)
        return PyErr_NoMemory();
    Py_ssize_t len = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        int hi, lo;
        if (p[i] == '%' && i + 2 < n
                && (hi = hexval((unsigned char)p[i + 1])) >= 0
                && (lo = hexval((unsigned char)p[i + 2])) >= 0) {
            buf[len++] = (char)(hi * 16 + lo);
            i += 2;
        } else {
            buf[len++] = p[i];
        }
    }
    PyObject *text = PyUnicode_DecodeLatin1(buf, len, NULL);
    if (buf != local)
        PyMem_Free(buf);
    return text;
}

/* The environ's own keys, interned once (PyDict_SetItemString would make
 * and intern a str per call). */
static PyObject *key_method, *key_path, *key_query, *key_protocol, *key_input, *key_http;

static int set_text(PyObject *env, PyObject *key, const char *p, Py_ssize_t n, int unquote)
{
    PyObject *text = latin1_text(p, n, unquote);
    if (text == NULL)
        return -1;
    int rc = PyDict_SetItem(env, key, text);
    Py_DECREF(text);
    return rc;
}

/* environ_key() of a name beyond ASCII (llhttp lets none through; as the
 * Python version does it, for the same answer): str.upper() of its latin-1. */
static PyObject *environ_key_unicode(PyObject *name)
{
    PyObject *text = PyUnicode_DecodeLatin1(PyBytes_AS_STRING(name), PyBytes_GET_SIZE(name),
                                            NULL);
    PyObject *upper = text ? PyObject_CallMethod(text, "upper", NULL) : NULL;
    PyObject *key = upper ? PyObject_CallMethod(upper, "replace", "ss", "-", "_") : NULL;
    Py_XDECREF(text);
    Py_XDECREF(upper);
    if (key == NULL || PyUnicode_CompareWithASCIIString(key, "CONTENT_TYPE") == 0
            || PyUnicode_CompareWithASCIIString(key, "CONTENT_LENGTH") == 0)
        return key;
    PyObject *prefixed = PyUnicode_FromFormat("HTTP_%U", key);
    Py_DECREF(key);
    return prefixed;
}

/* The environ key of a header field name: "HTTP_" + upper, "-" -> "_";
 * Content-Type and Content-Length without the prefix (CGI). */
static PyObject *environ_key(PyObject *name)
{
    const char *p = PyBytes_AS_STRING(name);
    Py_ssize_t n = PyBytes_GET_SIZE(name);
    for (Py_ssize_t i = 0; i < n; i++)
        if ((unsigned char)p[i] >= 0x80)
            return environ_key_unicode(name);   /* not a token: str.upper() rules */
    char local[256];
    char *buf = n + 5 <= (Py_ssize_t)sizeof local ? local : PyMem_Malloc((size_t)n + 5);
    if (buf == NULL)
        return PyErr_NoMemory();
    memcpy(buf, "HTTP_", 5);
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)p[i];
        buf[5 + i] = c == '-' ? '_' : (c >= 'a' && c <= 'z') ? (char)(c - 32) : (char)c;
    }
    PyObject *key;
    if ((n == 12 && memcmp(buf + 5, "CONTENT_TYPE", 12) == 0)
            || (n == 14 && memcmp(buf + 5, "CONTENT_LENGTH", 14) == 0))
        key = PyUnicode_DecodeLatin1(buf + 5, n, NULL);
    else
        key = PyUnicode_DecodeLatin1(buf, n + 5, NULL);
    if (buf != local)
        PyMem_Free(buf);
    return key;
}

static PyObject *speedups_environ(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 8) {
        PyErr_SetString(PyExc_TypeError,
                        "environ(base, method, target, version, headers, keys, extra, input)");
        return NULL;
    }
    PyObject *base = args[0], *method = args[1], *target = args[2], *version = args[3];
    PyObject *headers = args[4], *keys = args[5], *extra = args[6], *input = args[7];
    if (!PyDict_Check(base) || !PyBytes_Check(method) || !PyBytes_Check(target)
            || !PyList_Check(headers) || !PyDict_Check(keys) || !PyTuple_Check(extra)
            || PyTuple_GET_SIZE(extra) % 2) {
        PyErr_SetString(PyExc_TypeError, "environ(): bad argument types");
        return NULL;
    }
    PyObject *env = PyDict_Copy(base);
    if (env == NULL)
        return NULL;
    const char *url = PyBytes_AS_STRING(target);
    Py_ssize_t n = PyBytes_GET_SIZE(target);
    if (n == 0 || url[0] != '/') {
        if (n == 1 && url[0] == '*') {
            /* OPTIONS *: about the server as a whole, PATH_INFO "" */
            n = 0;
        } else {
            /* absolute-form (GET http://host/p?q): its path */
            const char *scheme = NULL;
            for (Py_ssize_t i = 0; i + 3 <= n; i++)
                if (memcmp(url + i, "://", 3) == 0) {
                    scheme = url + i;
                    break;
                }
            if (scheme != NULL) {
                Py_ssize_t from = scheme - url + 3;
                const char *slash = memchr(url + from, '/', (size_t)(n - from));
                if (slash != NULL) {
                    n -= slash - url;
                    url = slash;
                } else {
                    url = "/";
                    n = 1;
                }
            }
        }
    }
    const char *mark = memchr(url, '?', (size_t)n);
    Py_ssize_t path_len = mark ? mark - url : n;
    const char *query = mark ? mark + 1 : url + n;
    Py_ssize_t query_len = mark ? n - path_len - 1 : 0;
    const char *hash = memchr(query, '#', (size_t)query_len);
    if (hash != NULL)
        query_len = hash - query;
    if (set_text(env, key_method, PyBytes_AS_STRING(method), PyBytes_GET_SIZE(method), 0) < 0
            || set_text(env, key_path, url, path_len, 1) < 0
            || set_text(env, key_query, query, query_len, 0) < 0
            || PyDict_SetItem(env, key_protocol, version) < 0
            || PyDict_SetItem(env, key_input, input) < 0)
        goto fail;
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(extra); i += 2)
        if (PyDict_SetItem(env, PyTuple_GET_ITEM(extra, i), PyTuple_GET_ITEM(extra, i + 1)) < 0)
            goto fail;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(headers); i++) {
        PyObject *item = PyList_GET_ITEM(headers, i);
        if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 2
                || !PyBytes_Check(PyTuple_GET_ITEM(item, 0))
                || !PyBytes_Check(PyTuple_GET_ITEM(item, 1))) {
            PyErr_SetString(PyExc_TypeError, "environ(): headers must be (bytes, bytes)");
            goto fail;
        }
        PyObject *name = PyTuple_GET_ITEM(item, 0), *raw = PyTuple_GET_ITEM(item, 1);
        if (!PyBytes_CheckExact(name) || !PyBytes_CheckExact(raw)) {
            /* (a subclass's __eq__ could change the list under us) */
            PyErr_SetString(PyExc_TypeError, "environ(): header fields must be bytes");
            goto fail;
        }
        PyObject *key = PyDict_GetItemWithError(keys, name);    /* borrowed */
        if (key != NULL) {
            Py_INCREF(key);
        } else {
            if (PyErr_Occurred())
                goto fail;
            key = environ_key(name);
            if (key == NULL)
                goto fail;
            if (PyDict_GET_SIZE(keys) < 512 && PyDict_SetItem(keys, name, key) < 0) {
                Py_DECREF(key);
                goto fail;
            }
        }
        PyObject *text = PyUnicode_DecodeLatin1(PyBytes_AS_STRING(raw),
                                                PyBytes_GET_SIZE(raw), NULL);
        if (text == NULL) {
            Py_DECREF(key);
            goto fail;
        }
        PyObject *old = PyDict_GetItemWithError(env, key);      /* borrowed */
        int rc = 0;
        if (old == NULL) {
            rc = PyErr_Occurred() ? -1 : PyDict_SetItem(env, key, text);
        } else if (PyUnicode_Tailmatch(key, key_http, 0, 5, -1) == 1) {
            /* a repeated field: its values joined with "," (RFC 9110 5.3);
             * a repeated Content-Type keeps the first */
            PyObject *joined = PyUnicode_FromFormat("%U,%U", old, text);
            rc = joined == NULL ? -1 : PyDict_SetItem(env, key, joined);
            Py_XDECREF(joined);
        }
        Py_DECREF(text);
        Py_DECREF(key);
        if (rc < 0)
            goto fail;
    }
    return env;
fail:
    Py_DECREF(env);
    return NULL;
}

/* ------------------------------------------------------------ requests */

/* Request and Sink: the C versions of mps.http.message's PyRequest and
 * PySink (read those first; these mirror them line by line).  httptools
 * calls the sink's on_* methods as it parses; a Python sink's cost per
 * request was most of the parse (each callback a Python frame), these are
 * C calls. */

#include <structmember.h>
#include <time.h>

/* The exception classes and the shared empty body, handed over once by
 * mps.http.message (configure()). */
static PyObject *str_append, *str_get_method, *str_get_http_version, *str_should_keep_alive,
    *str_http11, *str_http10;
static PyObject *err_bad_request, *err_uri_too_long, *err_headers_too_large,
    *err_payload_too_large, *err_coding, *err_method, *err_version, *no_body;

static double monotonic(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

static PyObject *raise_new(PyObject *cls)
{
    if (cls == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "mps.http._speedups is not configured");
        return NULL;
    }
    PyErr_SetNone(cls);
    return NULL;
}

typedef struct {
    PyObject_HEAD
    PyObject *method, *url, *version, *headers, *body;
    double started;
    long long content_length, body_size, fields, chunks, framing;
    char keep_alive, chunked, expect_continue, complete, host;
} Request;

static PyTypeObject RequestType;

static Request *request_new(double started)
{
    if (no_body == NULL) {
        raise_new(NULL);    /* configure() has not run */
        return NULL;
    }
    Request *r = PyObject_GC_New(Request, &RequestType);
    if (r == NULL)
        return NULL;
    r->method = PyBytes_FromStringAndSize("", 0);
    r->url = PyBytes_FromStringAndSize("", 0);
    r->version = Py_NewRef(str_http11);
    r->headers = PyList_New(0);
    r->body = Py_NewRef(no_body);
    r->started = started;
    r->content_length = -1;
    r->body_size = r->fields = r->chunks = r->framing = 0;
    r->keep_alive = r->chunked = r->expect_continue = r->complete = r->host = 0;
    PyObject_GC_Track(r);
    if (r->method == NULL || r->url == NULL || r->version == NULL || r->headers == NULL) {
        Py_DECREF(r);
        return NULL;
    }
    return r;
}

static PyObject *request_py_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    (void)type;
    double started;
    static char *names[] = {"started", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "d", names, &started))
        return NULL;
    return (PyObject *)request_new(started);
}

static int request_traverse(Request *r, visitproc visit, void *arg)
{
    Py_VISIT(r->method);
    Py_VISIT(r->url);
    Py_VISIT(r->version);
    Py_VISIT(r->headers);
    Py_VISIT(r->body);
    return 0;
}

static int request_clear(Request *r)
{
    Py_CLEAR(r->method);
    Py_CLEAR(r->url);
    Py_CLEAR(r->version);
    Py_CLEAR(r->headers);
    Py_CLEAR(r->body);
    return 0;
}

static void request_dealloc(Request *r)
{
    PyObject_GC_UnTrack(r);
    request_clear(r);
    PyObject_GC_Del(r);
}

static PyObject *request_line(Request *r, PyObject *unused)
{
    (void)unused;
    if (!PyBytes_Check(r->method) || !PyBytes_Check(r->url)) {
        PyErr_SetString(PyExc_TypeError, "method and url must be bytes");
        return NULL;
    }
    Py_ssize_t m = PyBytes_GET_SIZE(r->method), u = PyBytes_GET_SIZE(r->url);
    if (u > 120)
        u = 120;
    PyObject *line = PyBytes_FromStringAndSize(NULL, m + 1 + u);
    if (line == NULL)
        return NULL;
    char *p = PyBytes_AS_STRING(line);
    memcpy(p, PyBytes_AS_STRING(r->method), (size_t)m);
    p[m] = ' ';
    memcpy(p + m + 1, PyBytes_AS_STRING(r->url), (size_t)u);
    return line;
}

/* The object fields: never deleted (the C reads them without a NULL check)
 * and of the type the C reads them as. */
struct field {
    size_t offset;
    PyTypeObject *type;     /* NULL: any object */
};

static struct field field_method = {offsetof(Request, method), &PyBytes_Type},
    field_url = {offsetof(Request, url), &PyBytes_Type},
    field_version = {offsetof(Request, version), &PyUnicode_Type},
    field_headers = {offsetof(Request, headers), &PyList_Type},
    field_body = {offsetof(Request, body), NULL};

static PyObject *request_get(Request *r, void *closure)
{
    return Py_NewRef(*(PyObject **)((char *)r + ((struct field *)closure)->offset));
}

static int request_set(Request *r, PyObject *value, void *closure)
{
    struct field *f = closure;
    if (value == NULL) {
        PyErr_SetString(PyExc_AttributeError, "a request's fields cannot be deleted");
        return -1;
    }
    if (f->type != NULL && !PyObject_TypeCheck(value, f->type)) {
        PyErr_Format(PyExc_TypeError, "must be %s, not %s", f->type->tp_name,
                     Py_TYPE(value)->tp_name);
        return -1;
    }
    Py_XSETREF(*(PyObject **)((char *)r + f->offset), Py_NewRef(value));
    return 0;
}

static PyGetSetDef request_getset[] = {
    {"method", (getter)request_get, (setter)request_set, NULL, &field_method},
    {"url", (getter)request_get, (setter)request_set, NULL, &field_url},
    {"version", (getter)request_get, (setter)request_set, NULL, &field_version},
    {"headers", (getter)request_get, (setter)request_set, NULL, &field_headers},
    {"body", (getter)request_get, (setter)request_set, NULL, &field_body},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMemberDef request_members[] = {
    {"started", T_DOUBLE, offsetof(Request, started), 0, NULL},
    {"content_length", T_LONGLONG, offsetof(Request, content_length), 0, NULL},
    {"body_size", T_LONGLONG, offsetof(Request, body_size), 0, NULL},
    {"fields", T_LONGLONG, offsetof(Request, fields), 0, NULL},
    {"chunks", T_LONGLONG, offsetof(Request, chunks), 0, NULL},
    {"framing", T_LONGLONG, offsetof(Request, framing), 0, NULL},
    {"keep_alive", T_BOOL, offsetof(Request, keep_alive), 0, NULL},
    {"chunked", T_BOOL, offsetof(Request, chunked), 0, NULL},
    {"expect_continue", T_BOOL, offsetof(Request, expect_continue), 0, NULL},
    {"complete", T_BOOL, offsetof(Request, complete), 0, NULL},
    {"host", T_BOOL, offsetof(Request, host), 0, NULL},
    {NULL, 0, 0, 0, NULL},
};

static PyMethodDef request_methods[] = {
    {"line", (PyCFunction)request_line, METH_NOARGS,
     "Method and path, bounded: what the status shows for a busy child."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject RequestType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "mps.http._speedups.Request",
    .tp_doc = "One parsed request (mps.http.message.PyRequest, in C).",
    .tp_basicsize = sizeof(Request),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = request_py_new,
    .tp_dealloc = (destructor)request_dealloc,
    .tp_traverse = (traverseproc)request_traverse,
    .tp_clear = (inquiry)request_clear,
    .tp_members = request_members,
    .tp_getset = request_getset,
    .tp_methods = request_methods,
};

typedef struct {
    PyObject_HEAD
    long long request_line, max_fields, field_size, max_body;
    double opened;
    Request *parsing, *last;        /* NULL: None */
    PyObject *ready;                /* a deque */
    PyObject *parser;               /* the httptools parser, or None */
    long long head_bytes;
} Sink;

static int sink_init(Sink *s, PyObject *args, PyObject *kwds)
{
    PyObject *ready;
    if ((kwds != NULL && PyDict_GET_SIZE(kwds)) || PyTuple_GET_SIZE(args) != 6) {
        PyErr_SetString(PyExc_TypeError,
                        "Sink(request_line, fields, field_size, max_body, opened, ready)");
        return -1;
    }
    long long limits[4];
    for (int i = 0; i < 4; i++) {
        limits[i] = PyLong_AsLongLong(PyTuple_GET_ITEM(args, i));
        if (limits[i] == -1 && PyErr_Occurred())
            return -1;
    }
    double opened = PyFloat_AsDouble(PyTuple_GET_ITEM(args, 4));
    if (opened == -1.0 && PyErr_Occurred())
        return -1;
    ready = PyTuple_GET_ITEM(args, 5);
    s->request_line = limits[0];
    s->max_fields = limits[1];
    s->field_size = limits[2];
    s->max_body = limits[3];
    s->opened = opened;
    Py_XSETREF(s->ready, Py_NewRef(ready));
    Py_XSETREF(s->parser, Py_NewRef(Py_None));
    Py_CLEAR(s->parsing);
    Py_CLEAR(s->last);
    s->head_bytes = 0;
    return 0;
}

static int sink_traverse(Sink *s, visitproc visit, void *arg)
{
    Py_VISIT(s->parsing);
    Py_VISIT(s->last);
    Py_VISIT(s->ready);
    Py_VISIT(s->parser);
    return 0;
}

static int sink_clear(Sink *s)
{
    Py_CLEAR(s->parsing);
    Py_CLEAR(s->last);
    Py_CLEAR(s->ready);
    Py_CLEAR(s->parser);
    return 0;
}

static void sink_dealloc(Sink *s)
{
    PyObject_GC_UnTrack(s);
    sink_clear(s);
    Py_TYPE(s)->tp_free((PyObject *)s);
}

static PyObject *sink_on_message_begin(Sink *s, PyObject *unused)
{
    (void)unused;
    Request *r = request_new(s->last != NULL ? monotonic() : s->opened);
    if (r == NULL)
        return NULL;
    Py_XSETREF(s->parsing, (Request *)Py_NewRef(r));
    Py_XSETREF(s->last, r);
    s->head_bytes = 0;
    Py_RETURN_NONE;
}

static PyObject *sink_on_url(Sink *s, PyObject *url)
{
    if (s->parsing == NULL || !PyBytes_Check(url)) {
        PyErr_SetString(PyExc_AssertionError, "on_url outside a request head");
        return NULL;
    }
    PyObject *joined = PyBytes_GET_SIZE(s->parsing->url) ? NULL : Py_NewRef(url);
    if (joined == NULL) {
        joined = Py_NewRef(s->parsing->url);
        PyBytes_Concat(&joined, url);
        if (joined == NULL)
            return NULL;
    }
    Py_SETREF(s->parsing->url, joined);
    if (PyBytes_GET_SIZE(joined) > s->request_line)
        return raise_new(err_uri_too_long);
    Py_RETURN_NONE;
}

/* bytes.strip() of [p, p+n): its ASCII whitespace off both ends. */
static void strip(const char **p, Py_ssize_t *n)
{
    static const char space[] = " \t\n\r\x0b\x0c";
    while (*n > 0 && memchr(space, (*p)[0], sizeof space - 1))
        (*p)++, (*n)--;
    while (*n > 0 && memchr(space, (*p)[*n - 1], sizeof space - 1))
        (*n)--;
}

static int bytes_is(const char *p, Py_ssize_t n, const char *low)
{
    Py_ssize_t len = (Py_ssize_t)strlen(low);
    if (n != len)
        return 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)p[i];
        if (c >= 'A' && c <= 'Z')
            c = (unsigned char)(c + 32);
        if (c != (unsigned char)low[i])
            return 0;
    }
    return 1;
}

static PyObject *sink_on_header(Sink *s, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2 || !PyBytes_Check(args[0]) || !PyBytes_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "on_header(name, value)");
        return NULL;
    }
    PyObject *name = args[0], *value = args[1];
    int trailer = s->parsing == NULL;       /* a trailer field, after a chunked body */
    Request *req = trailer ? s->last : s->parsing;
    if (req == NULL) {
        PyErr_SetString(PyExc_AssertionError, "on_header outside a request");
        return NULL;
    }
    req->fields += 1;
    if (req->fields > s->max_fields)
        return raise_new(err_headers_too_large);
    const char *n = PyBytes_AS_STRING(name), *v = PyBytes_AS_STRING(value);
    Py_ssize_t nlen = PyBytes_GET_SIZE(name), vlen = PyBytes_GET_SIZE(value);
    if (nlen + vlen > s->field_size)
        return raise_new(err_headers_too_large);
    if (trailer || memchr(n, '_', (size_t)nlen) != NULL)
        Py_RETURN_NONE;     /* trailers, and "_" (would alias "-" in HTTP_*): dropped */
    if (bytes_is(n, nlen, "transfer-encoding")) {
        /* every coding must be chunked: anything else is 501 */
        const char *p = v, *end = v + vlen;
        while (1) {
            const char *comma = memchr(p, ',', (size_t)(end - p));
            const char *stop = comma ? comma : end;
            const char *c = p;
            Py_ssize_t clen = stop - p;
            strip(&c, &clen);
            if (!bytes_is(c, clen, "chunked"))
                return raise_new(err_coding);
            if (comma == NULL)
                break;
            p = comma + 1;
        }
        req->chunked = 1;
    } else if (bytes_is(n, nlen, "host")) {
        if (req->host)      /* which one would the app believe? (RFC 9112 3.2) */
            return raise_new(err_bad_request);
        req->host = 1;
    } else if (bytes_is(n, nlen, "content-length")) {
        /* llhttp checked its digits; int() also takes surrounding space */
        const char *c = v;
        Py_ssize_t clen = vlen;
        strip(&c, &clen);
        if (clen == 0)
            return raise_new(err_bad_request);
        long long length = 0;
        for (Py_ssize_t i = 0; i < clen; i++) {
            if (c[i] < '0' || c[i] > '9')
                return raise_new(err_bad_request);
            /* saturate: anything this long is over max_body anyway */
            length = length > (LLONG_MAX - 9) / 10 ? LLONG_MAX : length * 10 + (c[i] - '0');
        }
        req->content_length = length;
    } else if (bytes_is(n, nlen, "expect")) {
        const char *c = v;
        Py_ssize_t clen = vlen;
        strip(&c, &clen);
        if (bytes_is(c, clen, "100-continue"))
            req->expect_continue = 1;
    }
    PyObject *pair = PyTuple_Pack(2, name, value);
    if (pair == NULL)
        return NULL;
    int rc = PyList_Append(req->headers, pair);
    Py_DECREF(pair);
    if (rc < 0)
        return NULL;
    Py_RETURN_NONE;
}

/* on_headers_complete's checks and bookkeeping, given what the parser
 * says of the head (``method`` a new reference, given away): for a request
 * the caller holds a reference to (ready.append may run Python code). */
static PyObject *headers_done(Sink *s, Request *req, PyObject *method, int v11, int v10,
                              int keep)
{
    Py_SETREF(req->method, method);
    if (!v11 && !v10)
        return raise_new(err_version);
    if (!PyBytes_Check(method)) {
        PyErr_SetString(PyExc_TypeError, "get_method() did not return bytes");
        return NULL;
    }
    const char *m = PyBytes_AS_STRING(method);
    Py_ssize_t mlen = PyBytes_GET_SIZE(method);
    if (mlen == 7 && memcmp(m, "CONNECT", 7) == 0)
        return raise_new(err_method);
    if (PyBytes_GET_SIZE(req->url) == 1 && PyBytes_AS_STRING(req->url)[0] == '*'
            && !(mlen == 7 && memcmp(m, "OPTIONS", 7) == 0))
        return raise_new(err_bad_request);     /* the asterisk-form is OPTIONS's alone */
    Py_SETREF(req->version, Py_NewRef(v11 ? str_http11 : str_http10));
    if (v11 && !req->host)
        return raise_new(err_bad_request);     /* a 1.1 request without Host: 400 */
    if (v10)
        req->expect_continue = 0;   /* no 1xx to a 1.0 client (RFC 9110 10.1.1) */
    req->keep_alive = (char)keep;
    if (req->content_length > s->max_body)
        return raise_new(err_payload_too_large);
    if (s->parsing == req)
        Py_CLEAR(s->parsing);
    PyObject *r = PyObject_CallMethodOneArg(s->ready, str_append, (PyObject *)req);
    if (r == NULL)
        return NULL;
    Py_DECREF(r);
    Py_RETURN_NONE;
}

static PyObject *call_parser(Sink *s, PyObject *name)
{
    return PyObject_CallMethodNoArgs(s->parser, name);
}

/* on_headers_complete's work, what httptools' parser says asked of it. */
static PyObject *headers_complete(Sink *s, Request *req)
{
    PyObject *method = call_parser(s, str_get_method);
    if (method == NULL)
        return NULL;
    PyObject *version = call_parser(s, str_get_http_version);
    if (version == NULL) {
        Py_DECREF(method);
        return NULL;
    }
    int v11 = PyUnicode_Check(version) && PyUnicode_CompareWithASCIIString(version, "1.1") == 0;
    int v10 = PyUnicode_Check(version) && PyUnicode_CompareWithASCIIString(version, "1.0") == 0;
    Py_DECREF(version);
    int k = 0;
    if (v11 || v10) {
        PyObject *keep = call_parser(s, str_should_keep_alive);
        if (keep == NULL) {
            Py_DECREF(method);
            return NULL;
        }
        k = PyObject_IsTrue(keep);
        Py_DECREF(keep);
        if (k < 0) {
            Py_DECREF(method);
            return NULL;
        }
    }
    return headers_done(s, req, method, v11, v10, k);
}

/* A Sink made without __init__ (Sink.__new__) has no deque and no parser. */
static int sink_ready(Sink *s)
{
    if (s->ready == NULL || s->parser == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Sink used before __init__");
        return 0;
    }
    return 1;
}

static PyObject *sink_on_headers_complete(Sink *s, PyObject *unused)
{
    (void)unused;
    Request *req = s->parsing;
    if (req == NULL) {
        PyErr_SetString(PyExc_AssertionError, "on_headers_complete outside a request head");
        return NULL;
    }
    if (!sink_ready(s))
        return NULL;
    Py_INCREF(req);
    PyObject *result = headers_complete(s, req);
    Py_DECREF(req);
    return result;
}

static PyObject *sink_on_body(Sink *s, PyObject *body)
{
    Request *req = s->last;
    if (req == NULL || !PyBytes_Check(body)) {
        PyErr_SetString(PyExc_AssertionError, "on_body outside a request");
        return NULL;
    }
    if (PyBytes_GET_SIZE(body) > s->max_body - req->body_size)     /* (no overflow) */
        return raise_new(err_payload_too_large);
    req->body_size += PyBytes_GET_SIZE(body);
    Py_INCREF(req);     /* the calls below may run Python code */
    PyObject *r = NULL;
    if (req->body == no_body) {
        PyObject *deque = PyObject_CallNoArgs((PyObject *)Py_TYPE(no_body));
        if (deque == NULL)
            goto done;
        Py_SETREF(req->body, deque);
    }
    r = PyObject_CallMethodOneArg(req->body, str_append, body);
done:
    Py_DECREF(req);
    if (r == NULL)
        return NULL;
    Py_DECREF(r);
    Py_RETURN_NONE;
}

static PyObject *sink_on_message_complete(Sink *s, PyObject *unused)
{
    (void)unused;
    if (s->last == NULL) {
        PyErr_SetString(PyExc_AssertionError, "on_message_complete outside a request");
        return NULL;
    }
    s->last->complete = 1;
    Py_RETURN_NONE;
}

static PyObject *sink_on_chunk_header(Sink *s, PyObject *unused)
{
    (void)unused;
    if (s->last == NULL) {
        PyErr_SetString(PyExc_AssertionError, "on_chunk_header outside a request");
        return NULL;
    }
    s->last->chunks += 1;
    Py_RETURN_NONE;
}

static PyObject *sink_get_request(Request *r)
{
    return r == NULL ? Py_NewRef(Py_None) : Py_NewRef((PyObject *)r);
}

static PyObject *sink_get_parsing(Sink *s, void *closure)
{
    (void)closure;
    return sink_get_request(s->parsing);
}

static PyObject *sink_get_last(Sink *s, void *closure)
{
    (void)closure;
    return sink_get_request(s->last);
}

static PyMemberDef sink_members[] = {
    {"ready", T_OBJECT_EX, offsetof(Sink, ready), READONLY, NULL},
    {"parser", T_OBJECT_EX, offsetof(Sink, parser), 0, NULL},
    {"opened", T_DOUBLE, offsetof(Sink, opened), READONLY, NULL},
    {"head_bytes", T_LONGLONG, offsetof(Sink, head_bytes), 0, NULL},
    {NULL, 0, 0, 0, NULL},
};

static PyGetSetDef sink_getset[] = {
    {"parsing", (getter)sink_get_parsing, NULL, "The request whose head is being parsed.", NULL},
    {"last", (getter)sink_get_last, NULL, "The latest request begun.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMethodDef sink_methods[] = {
    {"on_message_begin", (PyCFunction)sink_on_message_begin, METH_NOARGS, NULL},
    {"on_url", (PyCFunction)sink_on_url, METH_O, NULL},
    {"on_header", (PyCFunction)(void (*)(void))sink_on_header, METH_FASTCALL, NULL},
    {"on_headers_complete", (PyCFunction)sink_on_headers_complete, METH_NOARGS, NULL},
    {"on_body", (PyCFunction)sink_on_body, METH_O, NULL},
    {"on_message_complete", (PyCFunction)sink_on_message_complete, METH_NOARGS, NULL},
    {"on_chunk_header", (PyCFunction)sink_on_chunk_header, METH_NOARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject SinkType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "mps.http._speedups.Sink",
    .tp_doc = "Sink(request_line, fields, field_size, max_body, opened, ready): "
              "httptools' callbacks (mps.http.message.PySink, in C).",
    .tp_basicsize = sizeof(Sink),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)sink_init,
    .tp_dealloc = (destructor)sink_dealloc,
    .tp_traverse = (traverseproc)sink_traverse,
    .tp_clear = (inquiry)sink_clear,
    .tp_members = sink_members,
    .tp_getset = sink_getset,
    .tp_methods = sink_methods,
};

/* ------------------------------------------------------------ llhttp, directly
 *
 * The C loop (serve_one) parses with the llhttp that httptools bundles,
 * through the C API its parser module exports, and with C callbacks: the
 * same parser in the same strict mode (httptools sets no lenient flag, nor
 * do we), without the Python-level HttpRequestParser, its bound methods and
 * a Python call per callback (1.1 us in a microbenchmark; about 0.5 us of a
 * connection's 29 in the server).  The callbacks drive the Sink as httptools
 * does (a header field is handed on when its value ends), so the requests
 * are the same objects, checked by the same code.
 *
 * The settings struct below is llhttp 9.3's and later (on_protocol first
 * among the spans).  llhttp() checks the layout with probe requests before
 * anything uses it, every span is checked to lie in the bytes fed before it
 * is read, and the parser's own struct gets more room than it needs:
 * against any other llhttp the probes fail, and mps.http serves every
 * connection on the Python path instead (WSGIHandler.direct). */

#include <dlfcn.h>

typedef int (*ll_cb)(void *parser);
typedef int (*ll_data_cb)(void *parser, const char *at, size_t length);

struct ll_settings {
    ll_cb on_message_begin;
    ll_data_cb on_protocol, on_url, on_status, on_method, on_version, on_header_field,
        on_header_value, on_chunk_extension_name, on_chunk_extension_value;
    ll_cb on_headers_complete;
    ll_data_cb on_body;
    ll_cb on_message_complete, on_protocol_complete, on_url_complete, on_status_complete,
        on_method_complete, on_version_complete, on_header_field_complete,
        on_header_value_complete, on_chunk_extension_name_complete,
        on_chunk_extension_value_complete, on_chunk_header, on_chunk_complete, on_reset;
    void *spare[16];        /* (room for a later llhttp's, never read by ours) */
};

#define LL_HTTP_REQUEST 1
#define LL_PARSER_ROOM 512      /* llhttp 9.4's llhttp_t takes 96 bytes */

static struct {
    void (*init)(void *parser, int type, const struct ll_settings *settings);
    int (*execute)(void *parser, const char *data, size_t len);
    uint8_t (*method)(void *parser);
    const char *(*method_name)(int method);
    uint8_t (*major)(void *parser);
    uint8_t (*minor)(void *parser);
    int (*keep_alive)(void *parser);
    uint8_t (*upgrade)(void *parser);
} ll;
static int ll_bound;        /* llhttp() found it and the probes passed */
static struct ll_settings ll_settings;

/* One parse: llhttp's parser first (the callbacks' argument is its address). */
struct lone {
    union {
        unsigned char room[LL_PARSER_ROOM];
        void *align_p;
        uint64_t align_u;
    } parser;
    Sink *sink;
    const char *start, *end;        /* the bytes fed */
    const char *name, *value;       /* the header field being parsed */
    size_t name_len, value_len;
    char has_name, has_value;       /* (httptools: its current name/value is not None) */
};

/* A callback's span, joined to what it continues: -1 unless it lies in the
 * bytes fed (else this is not the llhttp we know) and, continuing a piece,
 * right after it (pieces of one field are adjacent in one buffer). */
static int lone_span(struct lone *l, const char *at, size_t n, const char **p, size_t *len,
                     char *has)
{
    if (at < l->start || at > l->end || n > (size_t)(l->end - at))
        return -1;
    if (!*has) {
        *p = at;
        *len = n;
        *has = 1;
        return 0;
    }
    if (*p + *len != at)
        return -1;
    *len += n;
    return 0;
}

/* A Sink call's result as a callback's: 0, or -1 with the exception kept
 * (the caller clears it: the Python path parses again and answers). */
static int lone_result(PyObject *r)
{
    if (r == NULL)
        return -1;
    Py_DECREF(r);
    return 0;
}

/* httptools' _maybe_call_on_header: the field whose value ended, to the Sink. */
static int lone_flush(struct lone *l)
{
    if (!l->has_value)
        return 0;
    if (!l->has_name)
        return -1;
    PyObject *args[2];
    args[0] = PyBytes_FromStringAndSize(l->name, (Py_ssize_t)l->name_len);
    args[1] = args[0] == NULL ? NULL
        : PyBytes_FromStringAndSize(l->value, (Py_ssize_t)l->value_len);
    l->has_name = l->has_value = 0;
    int rc = -1;
    if (args[0] != NULL && args[1] != NULL)
        rc = lone_result(sink_on_header(l->sink, args, 2));
    Py_XDECREF(args[0]);
    Py_XDECREF(args[1]);
    return rc;
}

static int lone_message_begin(void *p)
{
    struct lone *l = p;
    return lone_result(sink_on_message_begin(l->sink, NULL));
}

static int lone_url(void *p, const char *at, size_t n)
{
    struct lone *l = p;
    const char *u;
    size_t len;
    char has = 0;
    if (lone_span(l, at, n, &u, &len, &has) < 0)
        return -1;
    PyObject *url = PyBytes_FromStringAndSize(u, (Py_ssize_t)len);
    if (url == NULL)
        return -1;
    int rc = lone_result(sink_on_url(l->sink, url));
    Py_DECREF(url);
    return rc;
}

static int lone_header_field(void *p, const char *at, size_t n)
{
    struct lone *l = p;
    if (lone_flush(l) < 0)
        return -1;
    return lone_span(l, at, n, &l->name, &l->name_len, &l->has_name);
}

static int lone_header_value(void *p, const char *at, size_t n)
{
    struct lone *l = p;
    return lone_span(l, at, n, &l->value, &l->value_len, &l->has_value);
}

static int lone_headers_complete(void *p)
{
    struct lone *l = p;
    if (lone_flush(l) < 0)
        return -1;
    Request *req = l->sink->parsing;
    if (req == NULL || ll.upgrade(p))
        return -1;      /* (an upgrade: Python says what it says to one) */
    const char *name = ll.method_name(ll.method(p));
    PyObject *method = PyBytes_FromString(name != NULL ? name : "");
    if (method == NULL)
        return -1;
    int major = ll.major(p), minor = ll.minor(p);
    Py_INCREF(req);
    int rc = lone_result(headers_done(l->sink, req, method, major == 1 && minor == 1,
                                      major == 1 && minor == 0, ll.keep_alive(p) != 0));
    Py_DECREF(req);
    return rc;
}

static int lone_message_complete(void *p)
{
    struct lone *l = p;
    return lone_result(sink_on_message_complete(l->sink, NULL));
}

/* A body, a chunk: not the plain request the loop serves; Python's. */
static int lone_give_up(void *p)
{
    (void)p;
    return -1;
}

static int lone_give_up_data(void *p, const char *at, size_t n)
{
    (void)p, (void)at, (void)n;
    return -1;
}

/* Parse [data, data+n) into ``sink`` (fresh, its ready list empty): 0, or
 * -1 when the parser stopped (an error, whose exception the caller clears,
 * or a request the Python path serves). */
static int lone_parse(struct lone *l, Sink *sink, const char *data, size_t n)
{
    l->sink = sink;
    l->start = data;
    l->end = data + n;
    l->has_name = l->has_value = 0;
    ll.init(&l->parser, LL_HTTP_REQUEST, &ll_settings);
    int err = ll.execute(&l->parser, data, n);
    l->sink = NULL;
    return err == 0 ? 0 : -1;
}

/* A Sink of the limits, for lone_parse: ready a list. */
static Sink *lone_sink(long long request_line, long long fields, long long field_size,
                       long long max_body)
{
    Sink *s = PyObject_GC_New(Sink, &SinkType);
    if (s == NULL)
        return NULL;
    s->request_line = request_line;
    s->max_fields = fields;
    s->field_size = field_size;
    s->max_body = max_body;
    s->opened = 0.0;
    s->parsing = s->last = NULL;
    s->ready = PyList_New(0);
    s->parser = Py_NewRef(Py_None);
    s->head_bytes = 0;
    PyObject_GC_Track(s);
    if (s->ready == NULL) {
        Py_DECREF(s);
        return NULL;
    }
    return s;
}

/* The sink made ready for the next connection's first bytes. */
static int lone_reset(Sink *s, double opened)
{
    Py_CLEAR(s->parsing);
    Py_CLEAR(s->last);
    s->opened = opened;
    s->head_bytes = 0;
    return PyList_SetSlice(s->ready, 0, PyList_GET_SIZE(s->ready), NULL);
}

/* Each probe, and the request it must parse to (NULL fields: none). */
static const struct {
    const char *data, *method, *url, *version;
    const char *fields[4];
    int keep;
} ll_probes[] = {
    {"GET /probe?x=1 HTTP/1.1\r\nHost: h\r\nX-Probe: a b\r\n\r\n", "GET", "/probe?x=1",
     "HTTP/1.1", {"Host", "h", "X-Probe", "a b"}, 1},
    {"HEAD /p HTTP/1.0\r\nConnection: close\r\n\r\n", "HEAD", "/p", "HTTP/1.0",
     {"Connection", "close", NULL, NULL}, 0},
};

static int bytes_equal(PyObject *b, const char *s)
{
    return PyBytes_Check(b) && (size_t)PyBytes_GET_SIZE(b) == strlen(s)
        && memcmp(PyBytes_AS_STRING(b), s, strlen(s)) == 0;
}

/* 1 when every probe parses to its request, 0 when not, -1 on error. */
static int ll_probe(void)
{
    struct lone *l = PyMem_Calloc(1, sizeof *l);
    Sink *sink = lone_sink(8190, 100, 8190, 1 << 20);
    int ok = -1;
    if (l == NULL || sink == NULL)
        goto out;
    ok = 1;
    for (size_t i = 0; ok == 1 && i < sizeof ll_probes / sizeof ll_probes[0]; i++) {
        if (lone_reset(sink, 0.0) < 0) {
            ok = -1;
            break;
        }
        if (lone_parse(l, sink, ll_probes[i].data, strlen(ll_probes[i].data)) < 0) {
            PyErr_Clear();
            ok = 0;
            break;
        }
        Request *r = sink->last;
        if (PyList_GET_SIZE(sink->ready) != 1 || r == NULL
                || PyList_GET_ITEM(sink->ready, 0) != (PyObject *)r || !r->complete
                || r->keep_alive != ll_probes[i].keep
                || !bytes_equal(r->method, ll_probes[i].method)
                || !bytes_equal(r->url, ll_probes[i].url)
                || !PyUnicode_Check(r->version)
                || PyUnicode_CompareWithASCIIString(r->version, ll_probes[i].version) != 0
                || !PyList_Check(r->headers)) {
            ok = 0;
            break;
        }
        Py_ssize_t want = 0;
        while (want < 2 && ll_probes[i].fields[2 * want] != NULL)
            want++;
        if (PyList_GET_SIZE(r->headers) != want)
            ok = 0;
        for (Py_ssize_t f = 0; ok == 1 && f < want; f++) {
            PyObject *pair = PyList_GET_ITEM(r->headers, f);
            if (!PyTuple_Check(pair) || PyTuple_GET_SIZE(pair) != 2
                    || !bytes_equal(PyTuple_GET_ITEM(pair, 0), ll_probes[i].fields[2 * f])
                    || !bytes_equal(PyTuple_GET_ITEM(pair, 1), ll_probes[i].fields[2 * f + 1]))
                ok = 0;
        }
    }
out:
    if (ok < 0 && !PyErr_Occurred())
        PyErr_NoMemory();
    PyMem_Free(l);
    Py_XDECREF(sink);
    return ok;
}

/* llhttp(path) -> bool: bind the llhttp in httptools' parser module (its
 * file, loaded already) for serve_one, if it is one whose layout this file
 * knows (the probes parse as they must).  None unbinds it. */
static PyObject *speedups_llhttp(PyObject *module, PyObject *path)
{
    (void)module;
    ll_bound = 0;
    if (path == Py_None)
        Py_RETURN_FALSE;
    PyObject *encoded;
    if (!PyUnicode_FSConverter(path, &encoded))
        return NULL;
    void *so = dlopen(PyBytes_AS_STRING(encoded), RTLD_NOW | RTLD_NOLOAD);
    Py_DECREF(encoded);
    if (so == NULL)
        Py_RETURN_FALSE;        /* (not loaded: not the module in use) */
    static const char *names[] = {"llhttp_init", "llhttp_execute", "llhttp_get_method",
                                  "llhttp_method_name", "llhttp_get_http_major",
                                  "llhttp_get_http_minor", "llhttp_should_keep_alive",
                                  "llhttp_get_upgrade"};
    void *found[sizeof names / sizeof names[0]];
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        found[i] = dlsym(so, names[i]);
        if (found[i] == NULL) {
            dlclose(so);
            Py_RETURN_FALSE;    /* (ll keeps what it had: unbound, never called) */
        }
    }
    void **fns[] = {(void **)&ll.init, (void **)&ll.execute, (void **)&ll.method,
                    (void **)&ll.method_name, (void **)&ll.major, (void **)&ll.minor,
                    (void **)&ll.keep_alive, (void **)&ll.upgrade};
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
        *fns[i] = found[i];
    /* (the handle stays open: the module is never unloaded anyway) */
    memset(&ll_settings, 0, sizeof ll_settings);
    ll_settings.on_message_begin = lone_message_begin;
    ll_settings.on_url = lone_url;
    ll_settings.on_header_field = lone_header_field;
    ll_settings.on_header_value = lone_header_value;
    ll_settings.on_headers_complete = lone_headers_complete;
    ll_settings.on_body = lone_give_up_data;
    ll_settings.on_message_complete = lone_message_complete;
    ll_settings.on_chunk_header = lone_give_up;
    ll_settings.on_chunk_complete = lone_give_up;
    int ok = ll_probe();
    if (ok < 0)
        return NULL;
    ll_bound = ok;
    return PyBool_FromLong(ok);
}

/* parse_lone(data, request_line, fields, field_size, max_body) -> list | None:
 * the requests whose heads the C loop's parse of ``data`` completed, or None
 * where it stopped (tests compare it with httptools' Python API). */
static PyObject *speedups_parse_lone(PyObject *module, PyObject *args)
{
    (void)module;
    Py_buffer data;
    long long limits[4];
    if (!PyArg_ParseTuple(args, "y*LLLL:parse_lone", &data, &limits[0], &limits[1],
                          &limits[2], &limits[3]))
        return NULL;
    PyObject *out = NULL;
    struct lone *l = NULL;
    Sink *sink = NULL;
    if (!ll_bound) {
        PyErr_SetString(PyExc_RuntimeError, "parse_lone(): llhttp() is not bound");
        goto done;
    }
    l = PyMem_Calloc(1, sizeof *l);
    sink = lone_sink(limits[0], limits[1], limits[2], limits[3]);
    if (l == NULL || sink == NULL) {
        if (!PyErr_Occurred())
            PyErr_NoMemory();
        goto done;
    }
    if (lone_parse(l, sink, data.buf, (size_t)data.len) < 0) {
        PyErr_Clear();
        out = Py_NewRef(Py_None);
    } else {
        out = Py_NewRef(sink->ready);
    }
done:
    PyBuffer_Release(&data);
    PyMem_Free(l);
    Py_XDECREF(sink);
    return out;
}

static PyObject *speedups_configure(PyObject *module, PyObject *args)
{
    (void)module;
    PyObject *objs[8];
    if (!PyArg_ParseTuple(args, "OOOOOOOO", &objs[0], &objs[1], &objs[2], &objs[3], &objs[4],
                          &objs[5], &objs[6], &objs[7]))
        return NULL;
    PyObject **slots[8] = {&err_bad_request, &err_uri_too_long, &err_headers_too_large,
                           &err_payload_too_large, &err_coding, &err_method, &err_version,
                           &no_body};
    for (int i = 0; i < 8; i++)
        Py_XSETREF(*slots[i], Py_NewRef(objs[i]));
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------ respond */

/* Responder: one request's WSGI exchange in C, for the common case -- a
 * complete request without a body, an app that calls start_response and
 * returns a list (or tuple) of bytes.  It builds wsgi.input and the environ,
 * calls the app with a C start_response, builds the head and sends head and
 * body in one sendmsg().  Whatever it does not do itself it hands to
 * mps.http.wsgi (WSGIHandler.conclude) at the point it reached, with the
 * state that point needs: a write() from the app, an iterable that is not a
 * list, an error the app raised, a head the Python checks must refuse (they
 * say why), a partial send.  Nothing it does before that hand-over is seen
 * by the client or the app, so the Python path goes on as if it had run
 * from the start.  Per request this replaces eight Python frames. */

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdint.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include "_mpschild.h"

static PyObject *str_start_response, *str_write, *str_send_interim,
    *key_forwarded_for, *key_forwarded_proto;

static const char wdays[7][4] = {"Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"};
static const char months[12][4] = {"Jan", "Feb", "Mar", "Apr", "May", "Jun",
                                   "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"};
static PyObject *date_line;     /* "Date: ...\r\n" for date_second */
static time_t date_second = -1;

/* The Date header line (IMF-fixdate, whatever the locale), formatted at most
 * once a second: wsgi.Clock in C.  Borrowed. */
static PyObject *date_header(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    if (date_line == NULL || ts.tv_sec != date_second) {
        struct tm tm;
        if (gmtime_r(&ts.tv_sec, &tm) == NULL) {
            PyErr_SetString(PyExc_OverflowError, "the clock is beyond what gmtime() takes");
            return NULL;
        }
        char buf[64];
        int n = snprintf(buf, sizeof buf, "Date: %s, %02d %s %04d %02d:%02d:%02d GMT\r\n",
                         wdays[tm.tm_wday], tm.tm_mday, months[tm.tm_mon], tm.tm_year + 1900,
                         tm.tm_hour, tm.tm_min, tm.tm_sec);
        PyObject *line = PyBytes_FromStringAndSize(buf, n);
        if (line == NULL)
            return NULL;
        Py_XSETREF(date_line, line);
        date_second = ts.tv_sec;
    }
    return date_line;
}

static PyObject *speedups_date(PyObject *module, PyObject *unused)
{
    (void)module;
    (void)unused;
    return Py_XNewRef(date_header());
}

typedef struct {
    PyObject_HEAD
    /* what WSGIHandler hands over once (see its __init__) */
    PyObject *app, *base, *keys, *input_cls, *promote, *send_all, *client_gone,
        *header_error, *check, *forwarded;
    /* the connection loop (serve_one), once attach() ran in the child */
    int attached;
    struct mps_entry entry;         /* the C core's accept (see _mpschild.h) */
    Py_buffer buf;                  /* the child's read buffer */
    struct lone *lone;              /* the parse of each connection's first bytes */
    Sink *sink;                     /* its requests (ready: a list) */
    PyObject *make_socket, *finish;
    PyObject *handler;      /* the WSGIHandler: its server (name, port) cache */
    PyObject *server;       /* that pair, once known (it never changes after) */
    PyObject *keep;         /* what owns addr and addrlen (the board) */
} Responder;

/* One request's start_response, and the state of the exchange. */
typedef struct {
    PyObject_HEAD
    Responder *owner;
    PyObject *conn, *req, *input;
    PyObject *status, *headers;     /* start_response's; NULL before it */
    PyObject *promoted;             /* the Python wsgi.Response, once one was needed */
    PyObject *done;     /* once C sent the response: (length, sent, keep, body_allowed) */
    long code;
    int keep;
    int fd;             /* the connection's; -1 once it is closed (conn may be NULL) */
} Exchange;

static PyTypeObject ExchangeType, ResponderType;

static int exchange_traverse(Exchange *x, visitproc visit, void *arg)
{
    Py_VISIT(x->owner);
    Py_VISIT(x->conn);
    Py_VISIT(x->req);
    Py_VISIT(x->input);
    Py_VISIT(x->status);
    Py_VISIT(x->headers);
    Py_VISIT(x->promoted);
    Py_VISIT(x->done);
    return 0;
}

static int exchange_clear(Exchange *x)
{
    Py_CLEAR(x->owner);
    Py_CLEAR(x->conn);
    Py_CLEAR(x->req);
    Py_CLEAR(x->input);
    Py_CLEAR(x->status);
    Py_CLEAR(x->headers);
    Py_CLEAR(x->promoted);
    Py_CLEAR(x->done);
    return 0;
}

static void exchange_dealloc(Exchange *x)
{
    PyObject_GC_UnTrack(x);
    exchange_clear(x);
    PyObject_GC_Del(x);
}

/* The exchange's socket object (borrowed), made on first need for a
 * connection the C loop accepted; None once that connection is closed. */
static PyObject *exchange_conn(Exchange *x)
{
    if (x->conn != NULL)
        return x->conn;
    if (x->fd < 0 || x->owner == NULL || x->owner->make_socket == NULL)
        return Py_None;
    PyObject *conn = PyObject_CallFunction(x->owner->make_socket, "i", x->fd);
    if (conn == NULL)
        return NULL;
    if (x->conn != NULL || x->fd < 0) {
        /* make_socket is Python: meanwhile another thread made one, or the
         * connection was closed (and its fd may already be another's).
         * This object must never close that fd: detached, dropped. */
        PyObject *r = PyObject_CallMethod(conn, "detach", NULL);
        Py_XDECREF(r);
        Py_DECREF(conn);
        if (r == NULL)
            return NULL;
        return x->conn != NULL ? x->conn : Py_None;
    }
    x->conn = conn;
    return conn;
}

/* The Python Response that takes the exchange over from here -- also after
 * C has sent the response (``done``): a write() or start_response the app
 * kept and calls late then meets a response already sent, as in Python. */
static int exchange_promote(Exchange *x)
{
    if (x->promoted != NULL)
        return 0;
    if (x->owner == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "this start_response's exchange is over");
        return -1;
    }
    PyObject *conn = exchange_conn(x);
    if (conn == NULL)
        return -1;
    PyObject *resp = PyObject_CallFunctionObjArgs(
        x->owner->promote, conn, x->req, x->input, x->keep ? Py_True : Py_False,
        x->status ? x->status : Py_None, x->headers ? x->headers : Py_None,
        x->done ? x->done : Py_None, NULL);
    if (resp == NULL)
        return -1;
    if (x->promoted != NULL)    /* (another thread promoted it meanwhile: that one serves) */
        Py_DECREF(resp);
    else
        x->promoted = resp;
    return 0;
}

static PyObject *exchange_start_response(Exchange *x, PyObject *const *args, Py_ssize_t nargs,
                                         PyObject *kwnames)
{
    /* Sent by C already: a late call follows Python's rules for one. */
    if (x->promoted == NULL && x->done != NULL && exchange_promote(x) < 0)
        return NULL;
    if (x->promoted != NULL) {      /* Python serves this exchange now */
        PyObject *method = PyObject_GetAttr(x->promoted, str_start_response);
        if (method == NULL)
            return NULL;
        PyObject *result = PyObject_Vectorcall(method, args, (size_t)nargs, kwnames);
        Py_DECREF(method);
        return result;
    }
    PyObject *given[3] = {NULL, NULL, NULL};       /* status, headers, exc_info */
    static const char *names[3] = {"status", "headers", "exc_info"};
    if (nargs > 3)
        goto usage;
    for (Py_ssize_t i = 0; i < nargs; i++)
        given[i] = args[i];
    Py_ssize_t nkw = kwnames == NULL ? 0 : PyTuple_GET_SIZE(kwnames);
    for (Py_ssize_t j = 0; j < nkw; j++) {
        PyObject *name = PyTuple_GET_ITEM(kwnames, j);
        int which = -1;
        for (int k = 0; k < 3; k++)
            if (PyUnicode_CompareWithASCIIString(name, names[k]) == 0)
                which = k;
        if (which < 0 || given[which] != NULL)
            goto usage;
        given[which] = args[nargs + j];
    }
    PyObject *status = given[0], *headers = given[1], *exc_info = given[2];
    if (status == NULL || headers == NULL)
        goto usage;
    /* With exc_info the new status replaces the old: nothing of the head
     * can have been sent before Python took over (write() promotes). */
    if ((exc_info == NULL || exc_info == Py_None) && x->status != NULL) {
        PyErr_SetString(PyExc_AssertionError, "start_response called twice without exc_info");
        return NULL;
    }
    if (x->owner == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "this start_response's exchange is over");
        return NULL;
    }
    if (!valid_start(status, headers)) {
        PyObject *r = PyObject_CallFunctionObjArgs(x->owner->check, status, headers, NULL);
        if (r == NULL)
            return NULL;        /* the Python check's HeaderError, saying what is wrong */
        Py_DECREF(r);
        PyErr_Format(x->owner->header_error, "start_response(%R, %R) refused", status, headers);
        return NULL;
    }
    Py_XSETREF(x->status, Py_NewRef(status));
    Py_XSETREF(x->headers, Py_NewRef(headers));
    x->code = (PyUnicode_READ_CHAR(status, 0) - '0') * 100       /* (three digits: valid) */
        + (PyUnicode_READ_CHAR(status, 1) - '0') * 10 + (PyUnicode_READ_CHAR(status, 2) - '0');
    return PyObject_GetAttr((PyObject *)x, str_write);
usage:
    PyErr_SetString(PyExc_TypeError, "start_response(status, headers, exc_info=None)");
    return NULL;
}

static PyObject *exchange_write(Exchange *x, PyObject *data)
{
    if (exchange_promote(x) < 0)
        return NULL;
    return PyObject_CallMethodOneArg(x->promoted, str_write, data);
}

static PyMethodDef exchange_methods[] = {
    {"start_response", (PyCFunction)(void (*)(void))exchange_start_response,
     METH_FASTCALL | METH_KEYWORDS, "PEP 3333's start_response."},
    {"write", (PyCFunction)exchange_write, METH_O, "start_response's write()."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject ExchangeType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "mps.http._speedups.Exchange",
    .tp_doc = "One request's start_response (made by Responder.respond).",
    .tp_basicsize = sizeof(Exchange),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_dealloc = (destructor)exchange_dealloc,
    .tp_traverse = (traverseproc)exchange_traverse,
    .tp_clear = (inquiry)exchange_clear,
    .tp_methods = exchange_methods,
};

/* Send head and body in one sendmsg(); what the socket does not take at
 * once goes through the Python send_all (it waits, bounded). */
static int send_response(Responder *self, Exchange *x, PyObject *head, PyObject *body)
{
    int fd = x->fd;
    struct iovec iov[2] = {
        {PyBytes_AS_STRING(head), (size_t)PyBytes_GET_SIZE(head)},
        {body ? PyBytes_AS_STRING(body) : NULL, body ? (size_t)PyBytes_GET_SIZE(body) : 0},
    };
    size_t total = iov[0].iov_len + iov[1].iov_len;
    struct msghdr msg = {.msg_iov = iov, .msg_iovlen = iov[1].iov_len ? 2 : 1};
    ssize_t n;
    for (;;) {
        n = sendmsg(fd, &msg, MSG_DONTWAIT | MSG_NOSIGNAL);
        if (n >= 0)
            break;
        if (errno == EINTR) {
            if (PyErr_CheckSignals() < 0)
                return -1;
            continue;
        }
        if (errno != EAGAIN && errno != EWOULDBLOCK) {
            PyErr_SetNone(self->client_gone);    /* reset or closed: nobody to answer */
            return -1;
        }
        n = 0;
        break;
    }
    if ((size_t)n == total)
        return 0;
    PyObject *rest = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(total - (size_t)n));
    if (rest == NULL)
        return -1;
    char *p = PyBytes_AS_STRING(rest);
    size_t skip = (size_t)n;
    for (int i = 0; i < 2; i++) {
        if (skip >= iov[i].iov_len) {
            skip -= iov[i].iov_len;
            continue;
        }
        memcpy(p, (char *)iov[i].iov_base + skip, iov[i].iov_len - skip);
        p += iov[i].iov_len - skip;
        skip = 0;
    }
    PyObject *conn = exchange_conn(x);
    PyObject *r = conn == NULL ? NULL
        : PyObject_CallFunctionObjArgs(self->send_all, conn, rest, NULL);
    Py_DECREF(rest);
    if (r == NULL)
        return -1;
    Py_DECREF(r);
    return 0;
}

/* The body of a list (or tuple) of exactly-bytes parts as one bytes; NULL
 * without an exception when a part is anything else (Python says why). */
static PyObject *joined_body(PyObject *parts)
{
    Py_ssize_t count = PySequence_Fast_GET_SIZE(parts), total = 0;
    PyObject **items = PySequence_Fast_ITEMS(parts);
    for (Py_ssize_t i = 0; i < count; i++) {
        if (!PyBytes_CheckExact(items[i]))
            return NULL;
        if (PyBytes_GET_SIZE(items[i]) > PY_SSIZE_T_MAX - total)
            return PyErr_NoMemory();
        total += PyBytes_GET_SIZE(items[i]);
    }
    if (count == 1)
        return Py_NewRef(items[0]);
    PyObject *data = PyBytes_FromStringAndSize(NULL, total);
    if (data == NULL)
        return NULL;
    char *p = PyBytes_AS_STRING(data);
    for (Py_ssize_t i = 0; i < count; i++) {
        memcpy(p, PyBytes_AS_STRING(items[i]), (size_t)PyBytes_GET_SIZE(items[i]));
        p += PyBytes_GET_SIZE(items[i]);
    }
    return data;
}

/* Is this a request the C path answers: complete, no body, no 100-continue?
 * -1 on error. */
static int plain_request(Request *req)
{
    if (!req->complete || req->expect_continue)
        return 0;
    if (req->body != no_body) {
        int has_body = PyObject_IsTrue(req->body);
        if (has_body != 0)
            return has_body < 0 ? -1 : 0;
    }
    return 1;
}

/* respond() for a plain request (see plain_request), on ``conn`` (or, from
 * the C loop, NULL: fd alone, a socket object made if Python needs one),
 * ``reader`` None from the C loop (a plain request's body is never read).
 * The exchange is left in *xout (a new reference) when asked for. */
static PyObject *respond_core(Responder *self, PyObject *conn, int fd, PyObject *reader,
                              Request *req, PyObject *peer, int keep, Exchange **xout)
{
    PyObject *send = NULL, *input = NULL, *env = NULL, *start = NULL, *result = NULL,
        *error = NULL, *data = NULL, *head = NULL, *out = NULL, *code = NULL, *size = NULL,
        *date = NULL;
    Exchange *x = NULL;

    send = reader == Py_None ? Py_NewRef(Py_None) : PyObject_GetAttr(reader, str_send_interim);
    if (send == NULL)
        goto done;
    input = PyObject_CallFunctionObjArgs(self->input_cls, reader, (PyObject *)req, send, NULL);
    if (input == NULL)
        goto done;
    PyObject *eargs[8] = {self->base, req->method, req->url, req->version, req->headers,
                          self->keys, peer, input};
    env = speedups_environ(NULL, eargs, 8);
    if (env == NULL)
        goto done;
    int fwd = PyDict_Contains(env, key_forwarded_for);
    if (fwd == 0)
        fwd = PyDict_Contains(env, key_forwarded_proto);
    if (fwd < 0)
        goto done;
    if (fwd) {
        PyObject *r = PyObject_CallOneArg(self->forwarded, env);
        if (r == NULL)
            goto done;
        Py_DECREF(r);
    }
    x = PyObject_GC_New(Exchange, &ExchangeType);
    if (x == NULL)
        goto done;
    x->owner = (Responder *)Py_NewRef(self);
    x->conn = Py_XNewRef(conn);
    x->fd = fd;
    x->req = Py_NewRef((PyObject *)req);
    x->input = Py_NewRef(input);
    x->status = x->headers = x->promoted = x->done = NULL;
    x->code = 0;
    x->keep = keep;
    PyObject_GC_Track(x);
    start = PyObject_GetAttr((PyObject *)x, str_start_response);
    if (start == NULL)
        goto done;
    result = PyObject_CallFunctionObjArgs(self->app, env, start, NULL);
    if (result == NULL) {
        /* The app raised: Python logs it and decides what the client gets. */
        PyObject *type, *tb;
        PyErr_Fetch(&type, &error, &tb);
        PyErr_NormalizeException(&type, &error, &tb);
        if (tb != NULL && error != NULL)
            PyException_SetTraceback(error, tb);
        Py_XDECREF(type);
        Py_XDECREF(tb);
        if (error == NULL) {
            PyErr_SetString(PyExc_SystemError, "the app failed without an exception");
            goto done;
        }
        goto carry_on;
    }
    if (x->promoted != NULL || x->status == NULL
            || !(PyList_CheckExact(result) || PyTuple_CheckExact(result)))
        goto carry_on;
    data = joined_body(result);
    if (data == NULL) {
        if (PyErr_Occurred())
            goto done;
        goto carry_on;
    }
    /* (No wsgi.input error to answer for: a plain request's body is whole
     * and empty, so reading it never reaches the socket.) */
    date = Py_XNewRef(date_header());
    code = PyLong_FromLong(x->code);
    size = PyLong_FromSsize_t(PyBytes_GET_SIZE(data));
    if (date == NULL || code == NULL || size == NULL)
        goto done;
    int is_head = PyBytes_GET_SIZE(req->method) == 4
        && memcmp(PyBytes_AS_STRING(req->method), "HEAD", 4) == 0;
    int http11 = req->version == str_http11
        || PyUnicode_CompareWithASCIIString(req->version, "HTTP/1.1") == 0;
    PyObject *hargs[8] = {x->status, code, x->headers, size, is_head ? Py_True : Py_False,
                          http11 ? Py_True : Py_False, keep ? Py_True : Py_False, date};
    head = speedups_head(NULL, hargs, 8);
    if (head == NULL) {
        /* A header the app changed since start_response, a bad length:
         * the Python head() raises the HeaderError that says so. */
        PyErr_Clear();
        goto carry_on;
    }
    long long length = PyLong_AsLongLong(PyTuple_GET_ITEM(head, 1));
    int keeps = PyTuple_GET_ITEM(head, 2) == Py_True;
    int chunked = PyTuple_GET_ITEM(head, 3) == Py_True;
    int body_allowed = PyTuple_GET_ITEM(head, 4) == Py_True;
    Py_ssize_t n = PyBytes_GET_SIZE(data);
    int whole = body_allowed && n > 0;
    if (whole && (length != n || chunked))
        goto carry_on;      /* a declared length the body does not match */
    if (body_allowed && !whole && length > 0)
        keeps = 0;          /* less than declared: the framing is lost */
    /* Sent from here on, for anything the app calls late (see exchange_promote),
     * even while send_all waits with the GIL released. */
    PyObject *declared = PyLong_FromLongLong(length);
    PyObject *sent = PyLong_FromSsize_t(whole ? n : 0);
    x->done = declared == NULL || sent == NULL ? NULL
        : PyTuple_Pack(4, declared, sent, keeps ? Py_True : Py_False,
                       body_allowed ? Py_True : Py_False);
    Py_XDECREF(declared);
    Py_XDECREF(sent);
    if (x->done == NULL)
        goto done;
    if (send_response(self, x, PyTuple_GET_ITEM(head, 0), whole ? data : NULL) < 0)
        goto done;
    out = PyBool_FromLong(keeps);
    goto done;
carry_on:
    if (exchange_promote(x) < 0)
        goto done;
    out = PyTuple_Pack(5, x->promoted, input, env, result ? result : Py_None,
                       error ? error : Py_None);
done:
    Py_XDECREF(send);
    Py_XDECREF(input);
    Py_XDECREF(env);
    Py_XDECREF(start);
    Py_XDECREF(result);
    Py_XDECREF(error);
    Py_XDECREF(data);
    Py_XDECREF(head);
    Py_XDECREF(code);
    Py_XDECREF(size);
    Py_XDECREF(date);
    if (xout != NULL)
        *xout = x;
    else
        Py_XDECREF(x);
    return out;
}

/* respond(conn, reader, req, peer, keep) -> None | bool | tuple
 *   None: not a request this serves (Python serves it from the start);
 *   True/False: answered, and whether the connection goes on;
 *   (resp, input, environ, result, error): Python goes on from there
 *   (WSGIHandler.conclude): the app ran, returned ``result`` or raised
 *   ``error``, and ``resp`` holds what start_response was given. */
static PyObject *responder_respond(Responder *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (self->app == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Responder used before __init__");
        return NULL;
    }
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "respond(conn, reader, req, peer, keep)");
        return NULL;
    }
    PyObject *conn = args[0], *peer = args[3];
    if (Py_TYPE(args[2]) != &RequestType || !PyTuple_Check(peer))
        Py_RETURN_NONE;
    int plain = plain_request((Request *)args[2]);
    if (plain <= 0)
        return plain < 0 ? NULL : Py_NewRef(Py_None);
    int keep = PyObject_IsTrue(args[4]);
    if (keep < 0)
        return NULL;
    int fd = PyObject_AsFileDescriptor(conn);
    if (fd < 0)
        return NULL;
    return respond_core(self, conn, fd, args[1], (Request *)args[2], peer, keep, NULL);
}

/* ------------------------------------------------------------ the connection loop */

/* serve_one(idle_first): one connection, accepted and served in C where it
 * can be -- Python's worker loop calls it once per connection, in place of
 * Scoreboard.accept(), the handler and close().  The accept is the same C
 * call with the GIL released (mps_accept_busy); no socket object, no Reader,
 * no Python frame of mps's per connection.  It serves a connection whose
 * first read holds one plain request (complete, no body) that does not ask
 * to be kept alive: the one-connection-per-request shape.  Anything else it
 * hands to Python with what it read still in the child's buffer, for
 * WSGIHandler.__call__ to parse again from the start ("preread"): nothing of
 * the connection was answered, and the parse leaves nothing behind.
 *
 * Returns None (served, and closed), a negative errno (accept() failed:
 * what Scoreboard.accept raises), or (fd, preread) to hand over. */

static PyObject *str_close, *str_server, *key_remote_addr, *key_remote_port,
    *key_server_name, *key_server_port;

/* SERVER_NAME/PORT (borrowed, kept in self->server): the handler's, shared
 * with its peer() -- whichever path saw the child's first connection set
 * it, from that one -- and asked for once. */
static PyObject *loop_server(Responder *self, int fd)
{
    PyObject *server = PyObject_GetAttr(self->handler, str_server);
    if (server == NULL)
        return NULL;
    if (server == Py_None) {
        struct sockaddr_storage local;
        socklen_t len = sizeof local;
        char name[INET6_ADDRSTRLEN];
        int local_port;
        Py_DECREF(server);
        if (getsockname(fd, (struct sockaddr *)&local, &len) == 0
                && address_text((struct sockaddr *)&local, name, sizeof name, &local_port) == 0)
            server = Py_BuildValue("(sN)", name, PyUnicode_FromFormat("%d", local_port));
        else
            server = Py_BuildValue("(ss)", "localhost", "0");
        if (server == NULL || PyObject_SetAttr(self->handler, str_server, server) < 0) {
            Py_XDECREF(server);
            return NULL;
        }
    }
    if (!PyTuple_Check(server) || PyTuple_GET_SIZE(server) != 2) {
        Py_DECREF(server);
        PyErr_SetString(PyExc_TypeError, "handler.server: not a (name, port) pair");
        return NULL;
    }
    self->server = server;
    return server;
}

/* WSGIHandler.peer()'s tuple for the connection just accepted: an IP peer's
 * address and port, a Unix socket's peer REMOTE_ADDR "" alone (as Python's
 * for an address that is not a tuple); NULL without an exception for any
 * other family (Python serves it). */
static PyObject *loop_peer(Responder *self, int fd)
{
    char host[INET6_ADDRSTRLEN];
    int port;
    int unix_peer = ((const struct sockaddr *)self->entry.addr)->sa_family == AF_UNIX;
    if (!unix_peer
            && address_text((const struct sockaddr *)self->entry.addr, host, sizeof host, &port) < 0)
        return NULL;
    PyObject *server = self->server;
    if (server == NULL && (server = loop_server(self, fd)) == NULL)
        return NULL;
    if (unix_peer) {
        PyObject *empty = PyUnicode_FromString("");
        PyObject *peer = empty == NULL ? NULL
            : PyTuple_Pack(6, key_remote_addr, empty, key_server_name,
                           PyTuple_GET_ITEM(server, 0), key_server_port,
                           PyTuple_GET_ITEM(server, 1));
        Py_XDECREF(empty);
        return peer;
    }
    char digits[5];
    PyObject *remote = PyUnicode_FromString(host);
    PyObject *remote_port = PyUnicode_FromStringAndSize(digits, decimal((unsigned)port, digits));
    PyObject *peer = NULL;
    if (remote != NULL && remote_port != NULL)
        peer = PyTuple_Pack(8, key_remote_addr, remote, key_remote_port, remote_port,
                            key_server_name, PyTuple_GET_ITEM(server, 0), key_server_port,
                            PyTuple_GET_ITEM(server, 1));
    Py_XDECREF(remote);
    Py_XDECREF(remote_port);
    return peer;
}

static PyObject *hand_over(int fd, Py_ssize_t preread)
{
    PyObject *out = Py_BuildValue("(in)", fd, preread);
    if (out == NULL)
        close(fd);      /* (an exception means: accepted, failed, closed) */
    return out;
}

/* The plain request a first read parsed to, when that is all it holds and
 * it does not ask for keep-alive; NULL (no exception) otherwise, or with
 * one on error.  A new reference. */
static Request *lone_request(Sink *sink)
{
    if (sink->parsing != NULL || PyList_GET_SIZE(sink->ready) != 1)
        return NULL;
    Request *req = (Request *)PyList_GET_ITEM(sink->ready, 0);    /* (lone_sink's list) */
    if (req != sink->last || req->keep_alive || plain_request(req) <= 0)
        return NULL;    /* (plain_request's error, if any, reaches the caller) */
    return (Request *)Py_NewRef(req);
}

/* How long a connection accepted before its first bytes may wait for them
 * here.  Behind a listener without TCP_DEFER_ACCEPT (one handed in: systemd,
 * fd://) a child can take a connection before its request arrives; the
 * bytes are almost always on their way, and waiting for them here serves
 * the request in C, where handing over to Python served one in eight
 * connections under load at several times the cost.  A client that sends
 * nothing meanwhile goes to Python, which times its header out.
 *
 * Before it sleeps there, it asks again a few times: the client is most
 * often in the middle of its send() on the other core, and the bytes come
 * within a microsecond or two.  A sleep and a wake-up cost more than these
 * reads (under the bench's close load, 0.12-0.14 first reads per request
 * found nothing; with eight retries 0.01-0.02 still sleep, with fewer
 * context switches, and in interleaved pairs each request took about 1 us
 * less CPU).  Eight failed recv() calls cost a few microseconds at most. */
#define FIRST_BYTES_WAIT_MS 200
#define FIRST_BYTES_RETRIES 8

static PyObject *serve_connection(Responder *self, int fd)
{
    ssize_t n = recv(fd, self->buf.buf, (size_t)self->buf.len, MSG_DONTWAIT);
    int err = n < 0 ? errno : 0;
    for (int i = 0; n < 0 && err == EAGAIN && i < FIRST_BYTES_RETRIES; i++) {
        n = recv(fd, self->buf.buf, (size_t)self->buf.len, MSG_DONTWAIT);
        err = n < 0 ? errno : 0;
    }
    if (n < 0 && err == EAGAIN) {
        struct pollfd first = {.fd = fd, .events = POLLIN};
        int ready;
        Py_BEGIN_ALLOW_THREADS
        ready = poll(&first, 1, FIRST_BYTES_WAIT_MS);
        Py_END_ALLOW_THREADS
        if (ready == 1) {       /* (a signal, or nothing in time: Python's) */
            n = recv(fd, self->buf.buf, (size_t)self->buf.len, MSG_DONTWAIT);
            err = n < 0 ? errno : 0;
        }
    }
    if (n == 0 || (n < 0 && (err == ECONNRESET || err == ETIMEDOUT))) {
        close(fd);              /* gone before a request: nobody to answer */
        Py_RETURN_NONE;
    }
    if (n < 0)
        return hand_over(fd, 0);    /* nothing yet (or EINTR): Python waits for it */
    PyObject *peer = NULL, *out = NULL;
    Request *req = NULL;
    Exchange *x = NULL;
    Sink *sink = self->sink;

    if (!ll_bound)
        goto python;            /* (llhttp(None) since attach: Python parses) */
    if (lone_reset(sink, monotonic()) < 0)     /* (the last connection's request let go) */
        goto fail;
    if (lone_parse(self->lone, sink, self->buf.buf, (size_t)n) < 0) {
        PyErr_Clear();          /* bad input, an upgrade, a body: Python parses again */
        goto python;
    }
    req = lone_request(sink);
    if (req == NULL) {
        if (PyErr_Occurred())
            goto fail;
        goto python;
    }
    peer = loop_peer(self, fd);
    if (peer == NULL) {
        if (PyErr_Occurred())
            goto fail;
        goto python;
    }
    /* (bytes end in a NUL, and llhttp lets none into either) */
    self->entry.begin(self->entry.board, self->entry.slot, PyBytes_AS_STRING(req->method),
                PyBytes_AS_STRING(req->url));
    out = respond_core(self, NULL, fd, Py_None, req, peer, 0, &x);
    if (out == NULL) {
        if (!PyErr_ExceptionMatches(self->client_gone))
            goto fail;
        PyErr_Clear();          /* reset: nobody to answer */
    } else if (PyTuple_Check(out)) {
        /* The app ran; Python sends what it left (conclude). */
        PyObject *r = PyObject_CallFunctionObjArgs(self->finish, (PyObject *)req, out, NULL);
        if (r == NULL)
            goto fail;
        Py_DECREF(r);
    }
    goto closing;
python:
    /* Nothing answered: Python serves the connection, from what was read. */
    Py_XDECREF(peer);
    Py_XDECREF((PyObject *)req);
    return hand_over(fd, n);
fail:
closing:
    {
        /* Close the connection: through its socket object when Python made
         * one (the object owns the fd then), else here. */
        PyObject *exc_type, *exc_value, *exc_tb;
        PyErr_Fetch(&exc_type, &exc_value, &exc_tb);
        if (x != NULL && x->conn != NULL && x->conn != Py_None) {
            PyObject *r = PyObject_CallMethodNoArgs(x->conn, str_close);
            if (r == NULL)
                PyErr_Clear();
            Py_XDECREF(r);
        } else {
            close(fd);
        }
        if (x != NULL)
            x->fd = -1;
        PyErr_Restore(exc_type, exc_value, exc_tb);
    }
    Py_XDECREF(peer);
    Py_XDECREF((PyObject *)req);
    Py_XDECREF((PyObject *)x);
    if (PyErr_Occurred()) {
        Py_XDECREF(out);
        return NULL;
    }
    Py_XDECREF(out);
    Py_RETURN_NONE;
}

static PyObject *responder_serve_one(Responder *self, PyObject *idle_first_obj)
{
    if (!self->attached) {
        PyErr_SetString(PyExc_RuntimeError, "serve_one() before attach()");
        return NULL;
    }
    int idle_first = PyObject_IsTrue(idle_first_obj);
    if (idle_first < 0)
        return NULL;
    int fd = mps_entry_accept(&self->entry, idle_first);
    if (fd < 0)
        return PyLong_FromLong(fd);
    return serve_connection(self, fd);
}

/* attach(entry, owner, buffer, limits, make_socket, handler): set up
 * serve_one() in a child (see WSGIHandler.direct), once llhttp() bound the
 * parser; ``owner`` keeps the entry's memory alive, ``handler`` gives
 * finish() and the server-name cache. */
static PyObject *responder_attach(Responder *self, PyObject *args)
{
    struct mps_entry entry;
    long long request_line, fields, field_size, max_body;
    PyObject *owner, *buffer, *make_socket, *handler;
    if (!PyArg_ParseTuple(args, "O&OO(LLLL)OO:attach", mps_entry_converter, &entry, &owner,
                          &buffer, &request_line, &fields, &field_size, &max_body,
                          &make_socket, &handler))
        return NULL;
    if (!ll_bound) {
        PyErr_SetString(PyExc_RuntimeError, "attach(): llhttp() is not bound");
        return NULL;
    }
    if (self->lone == NULL && (self->lone = PyMem_Calloc(1, sizeof *self->lone)) == NULL)
        return PyErr_NoMemory();
    Sink *sink = lone_sink(request_line, fields, field_size, max_body);
    if (sink == NULL)
        return NULL;
    PyObject *finish = PyObject_GetAttrString(handler, "finish");
    if (finish == NULL) {
        Py_DECREF(sink);
        return NULL;
    }
    if (self->attached) {
        PyBuffer_Release(&self->buf);
        self->attached = 0;
    }
    if (PyObject_GetBuffer(buffer, &self->buf, PyBUF_WRITABLE | PyBUF_SIMPLE) < 0) {
        Py_DECREF(sink);
        Py_DECREF(finish);
        return NULL;
    }
    if (self->buf.len < 1) {
        PyBuffer_Release(&self->buf);
        Py_DECREF(sink);
        Py_DECREF(finish);
        PyErr_SetString(PyExc_ValueError, "attach(): an empty buffer");
        return NULL;
    }
    Py_XSETREF(self->sink, sink);
    self->entry = entry;
    Py_XSETREF(self->make_socket, Py_NewRef(make_socket));
    Py_XSETREF(self->finish, finish);
    Py_XSETREF(self->handler, Py_NewRef(handler));
    Py_CLEAR(self->server);
    Py_XSETREF(self->keep, Py_NewRef(owner));
    self->attached = 1;
    Py_RETURN_NONE;
}

static int responder_init(Responder *self, PyObject *args, PyObject *kwds)
{
    static char *names[] = {"app", "base", "keys", "input", "promote", "send_all",
                            "client_gone", "header_error", "check", "forwarded", NULL};
    PyObject *o[10];
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO!O!OOOOOOO:Responder", names, &o[0],
                                     &PyDict_Type, &o[1], &PyDict_Type, &o[2], &o[3], &o[4],
                                     &o[5], &o[6], &o[7], &o[8], &o[9]))
        return -1;
    PyObject **slots[10] = {&self->app, &self->base, &self->keys, &self->input_cls,
                            &self->promote, &self->send_all, &self->client_gone,
                            &self->header_error, &self->check, &self->forwarded};
    for (int i = 0; i < 10; i++)
        Py_XSETREF(*slots[i], Py_NewRef(o[i]));
    return 0;
}

static int responder_traverse(Responder *self, visitproc visit, void *arg)
{
    Py_VISIT(self->app);
    Py_VISIT(self->base);
    Py_VISIT(self->keys);
    Py_VISIT(self->input_cls);
    Py_VISIT(self->promote);
    Py_VISIT(self->send_all);
    Py_VISIT(self->client_gone);
    Py_VISIT(self->header_error);
    Py_VISIT(self->check);
    Py_VISIT(self->forwarded);
    Py_VISIT(self->sink);
    Py_VISIT(self->make_socket);
    Py_VISIT(self->finish);
    Py_VISIT(self->handler);
    Py_VISIT(self->server);
    Py_VISIT(self->keep);
    if (self->attached)
        Py_VISIT(self->buf.obj);
    return 0;
}

static int responder_clear(Responder *self)
{
    Py_CLEAR(self->app);
    Py_CLEAR(self->base);
    Py_CLEAR(self->keys);
    Py_CLEAR(self->input_cls);
    Py_CLEAR(self->promote);
    Py_CLEAR(self->send_all);
    Py_CLEAR(self->client_gone);
    Py_CLEAR(self->header_error);
    Py_CLEAR(self->check);
    Py_CLEAR(self->forwarded);
    Py_CLEAR(self->sink);
    Py_CLEAR(self->make_socket);
    Py_CLEAR(self->finish);
    Py_CLEAR(self->handler);
    Py_CLEAR(self->server);
    Py_CLEAR(self->keep);
    if (self->attached) {
        self->attached = 0;
        PyBuffer_Release(&self->buf);
    }
    return 0;
}

static void responder_dealloc(Responder *self)
{
    PyObject_GC_UnTrack(self);
    responder_clear(self);
    PyMem_Free(self->lone);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef responder_methods[] = {
    {"respond", (PyCFunction)(void (*)(void))responder_respond, METH_FASTCALL,
     "respond(conn, reader, req, peer, keep) -> None | bool | "
     "(resp, input, environ, result, error)"},
    {"attach", (PyCFunction)responder_attach, METH_VARARGS,
     "attach(entry, owner, buffer, limits, make_socket, handler)"},
    {"serve_one", (PyCFunction)responder_serve_one, METH_O,
     "serve_one(idle_first) -> None | -errno | (fd, preread)"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject ResponderType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "mps.http._speedups.Responder",
    .tp_doc = "One WSGI app's common-case request, served in C (see respond).",
    .tp_basicsize = sizeof(Responder),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)responder_init,
    .tp_dealloc = (destructor)responder_dealloc,
    .tp_traverse = (traverseproc)responder_traverse,
    .tp_clear = (inquiry)responder_clear,
    .tp_methods = responder_methods,
};

/* ------------------------------------------------------------ module */

static PyMethodDef speedups_methods[] = {
    {"valid", (PyCFunction)(void (*)(void))speedups_valid, METH_FASTCALL,
     "valid(status, headers) -> bool: what start_response may accept."},
    {"head", (PyCFunction)(void (*)(void))speedups_head, METH_FASTCALL,
     "head(status, code, headers, known_length, is_head, http11, keep, date)"
     " -> (head, length, keep, chunked, body_allowed)."},
    {"environ", (PyCFunction)(void (*)(void))speedups_environ, METH_FASTCALL,
     "environ(base, method, target, version, headers, keys, extra, input) -> dict."},
    {"llhttp", speedups_llhttp, METH_O,
     "llhttp(path) -> bool: parse in serve_one with the llhttp of httptools' parser "
     "module at path, if its probes pass (None: stop)."},
    {"parse_lone", speedups_parse_lone, METH_VARARGS,
     "parse_lone(data, request_line, fields, field_size, max_body) -> list | None: "
     "serve_one's parse, for tests."},
    {"date", speedups_date, METH_NOARGS,
     "date() -> bytes: the Date header line, formatted at most once a second."},
    {"configure", speedups_configure, METH_VARARGS,
     "configure(BadRequest, URITooLong, HeadersTooLarge, PayloadTooLarge, "
     "NotImplementedCoding, NotImplementedMethod, VersionNotSupported, no_body)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef speedups_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "mps.http._speedups",
    .m_doc = "The WSGI layer's per-request string work in C (see mps/http/wsgi.py).",
    .m_size = 0,
    .m_methods = speedups_methods,
};

PyMODINIT_FUNC PyInit__speedups(void)
{
    if (PyType_Ready(&RequestType) < 0 || PyType_Ready(&SinkType) < 0
            || PyType_Ready(&ExchangeType) < 0 || PyType_Ready(&ResponderType) < 0)
        return NULL;
    if ((str_append = PyUnicode_InternFromString("append")) == NULL
            || (str_get_method = PyUnicode_InternFromString("get_method")) == NULL
            || (str_get_http_version = PyUnicode_InternFromString("get_http_version")) == NULL
            || (str_should_keep_alive = PyUnicode_InternFromString("should_keep_alive")) == NULL
            || (str_http11 = PyUnicode_InternFromString("HTTP/1.1")) == NULL
            || (str_http10 = PyUnicode_InternFromString("HTTP/1.0")) == NULL
            || (key_method = PyUnicode_InternFromString("REQUEST_METHOD")) == NULL
            || (key_path = PyUnicode_InternFromString("PATH_INFO")) == NULL
            || (key_query = PyUnicode_InternFromString("QUERY_STRING")) == NULL
            || (key_protocol = PyUnicode_InternFromString("SERVER_PROTOCOL")) == NULL
            || (key_input = PyUnicode_InternFromString("wsgi.input")) == NULL
            || (key_http = PyUnicode_InternFromString("HTTP_")) == NULL
            || (str_start_response = PyUnicode_InternFromString("start_response")) == NULL
            || (str_write = PyUnicode_InternFromString("write")) == NULL
            || (str_send_interim = PyUnicode_InternFromString("send_interim")) == NULL
            || (key_forwarded_for = PyUnicode_InternFromString("HTTP_X_FORWARDED_FOR")) == NULL
            || (key_forwarded_proto = PyUnicode_InternFromString("HTTP_X_FORWARDED_PROTO"))
                == NULL
            || (str_close = PyUnicode_InternFromString("close")) == NULL
            || (str_server = PyUnicode_InternFromString("server")) == NULL
            || (key_remote_addr = PyUnicode_InternFromString("REMOTE_ADDR")) == NULL
            || (key_remote_port = PyUnicode_InternFromString("REMOTE_PORT")) == NULL
            || (key_server_name = PyUnicode_InternFromString("SERVER_NAME")) == NULL
            || (key_server_port = PyUnicode_InternFromString("SERVER_PORT")) == NULL)
        return NULL;
    PyObject *module = PyModule_Create(&speedups_module);
    if (module == NULL)
        return NULL;
    if (PyModule_AddObjectRef(module, "Request", (PyObject *)&RequestType) < 0
            || PyModule_AddObjectRef(module, "Sink", (PyObject *)&SinkType) < 0
            || PyModule_AddObjectRef(module, "Responder", (PyObject *)&ResponderType) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
