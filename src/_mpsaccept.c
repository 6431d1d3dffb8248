/*
 * _mpsaccept.c - mps._accept: a child's accept, start to finish in C.
 *
 *   Acceptor(entry, owner, socket_type, family, type, proto, decode, template=None)
 *       entry: what Scoreboard.accept_entry(slot, listener) hands over (the
 *       C core's mps_accept_busy, the board, the slot, the fds and the peer
 *       buffer, as addresses); owner keeps that memory alive (the board);
 *       socket_type(family, type, proto, fd) makes the connection's socket;
 *       decode(addrlen) turns the buffer into the address of any family
 *       other than IPv4.
 *   acceptor(idle_first) -> (socket, address)
 *       Scoreboard.accept(slot, listener, idle_first), with no Python frame
 *       of mps's for an IPv4 peer: the same C call with the GIL released
 *       (the idle transition, the wait in epoll, accept4(), the busy
 *       transition), then the socket object and the (host, port) pair built
 *       here.  Raises OSError as accept() does.  A connection accepted but
 *       lost on the way (its socket or address could not be made) leaves
 *       the slot busy; the next call then makes the idle transition first,
 *       whatever its idle_first.
 *
 * Why: per connection, the Python wrapper around that C call -- cffi's
 * conversion of eight arguments, the method's frame, the peer's decoding --
 * cost about as much as the C call's own user time, and the naive Python
 * prefork that issue 11 measures mps against pays none of it (its accept()
 * is one C call too).  The socket is still socket.socket's (the handler's
 * API), made the way socket.accept() makes it.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <errno.h>
#include <fcntl.h>
#include <stddef.h>
#include <stdint.h>
#include <unistd.h>

#include "_mpschild.h"

/* What template() checked and copied, handed to each child's Acceptor. */
struct socket_template {
    uintptr_t socket_type;              /* the type it was made for (the same after fork) */
    int family, type, proto;
    Py_ssize_t fields;                  /* _socket.socket's bytes after the header */
    Py_ssize_t io_refs_at, closed_at;   /* socket.socket's two slots */
    char bytes[64];                     /* a fresh socket's fields */
};

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;      /* acceptor(idle_first): no argument tuple */
    int ready;                      /* __init__ ran */
    struct mps_entry entry;         /* the C core's accept (see _mpschild.h) */
    PyObject *owner, *socket_type, *decode;
    PyObject *family, *type, *proto;        /* socket_type's first three arguments */
    int idle_owed;          /* a connection was lost after its busy transition */
    /* The fast socket (see "the socket object" below): fast is 0 without a
     * template that fits this acceptor. */
    int fast;
    struct socket_template t;
} Acceptor;

/* ------------------------------------------------------------ the socket object
 *
 * socket.socket(family, type, proto, fd) runs socket.py's __init__ (a Python
 * frame), _socket.socket.__init__ -- which calls getsockname() to check that
 * fd is a socket, a system call per connection for a descriptor accept4()
 * just made -- and sets two slots.  What it leaves is a fresh socket's C
 * fields (the fd, family, type and proto as given, the default timeout, the
 * error handler) and _io_refs = 0, _closed = False.
 *
 * So the master, once before it forks (template(), from
 * Scoreboard.prepare_accept: in a child the probe would copy the pages of
 * everything it touches), makes one socket that way, from a duplicate of
 * the listener, and checks it: the fd, family, type and proto where CPython's
 * socket object keeps them (PySocketSockObject, Modules/socketmodule.h), and
 * the two slots where their member descriptors say.  If every check passes,
 * each new socket is allocated by its type and gets that socket's fields
 * with its own fd, and the two slots -- the state __init__ would have left
 * -- and __init__'s audit event is raised for it.
 * If any fails (another CPython's layout, a socket type of the app's), or
 * while a default timeout is set (socket.setdefaulttimeout: __init__ would
 * also make the fd non-blocking), sockets are made by calling the type. */

/* The offset of socket_type's member slot ``name`` (an object slot), or -1. */
static Py_ssize_t slot_offset(PyObject *socket_type, const char *name)
{
    PyObject *descr = PyObject_GetAttrString(socket_type, name);
    if (descr == NULL) {
        PyErr_Clear();
        return -1;
    }
    Py_ssize_t at = -1;
    if (Py_IS_TYPE(descr, &PyMemberDescr_Type)) {
        PyMemberDef *member = ((PyMemberDescrObject *)descr)->d_member;
        if (member->type == T_OBJECT_EX)
            at = member->offset;
    }
    Py_DECREF(descr);
    return at;
}

static PyObject *default_timeout;       /* _socket.getdefaulttimeout */

static int timeout_is_default(void)
{
    PyObject *timeout = PyObject_CallNoArgs(default_timeout);
    if (timeout == NULL) {
        PyErr_Clear();
        return 0;
    }
    Py_DECREF(timeout);
    return timeout == Py_None;
}

/* Make a socket the slow way and keep its fields in t, if it is laid out as
 * this file expects.  Never raises: 0 leaves the slow way. */
static int probe_layout(PyObject *socket_type, int family, int type, int proto, int listen_fd,
                        struct socket_template *t)
{
    /* socket.socket itself, on _socket.socket itself: no subclass of the
     * app's, whose __init__ might do more (from 3.12 both are heap types,
     * so identity, not the type's flags, says what they are) */
    PyObject *socket_module = PyImport_ImportModule("socket");
    PyObject *c_module = PyImport_ImportModule("_socket");
    PyObject *py_type = socket_module ? PyObject_GetAttrString(socket_module, "socket") : NULL;
    PyObject *c_type = c_module ? PyObject_GetAttrString(c_module, "socket") : NULL;
    Py_XDECREF(socket_module);
    Py_XDECREF(c_module);
    int known = py_type != NULL && py_type == socket_type && c_type != NULL
        && PyType_Check(py_type) && (PyObject *)((PyTypeObject *)py_type)->tp_base == c_type;
    Py_XDECREF(py_type);
    Py_XDECREF(c_type);
    PyErr_Clear();
    if (!known)
        return 0;
    PyTypeObject *tp = (PyTypeObject *)socket_type, *base = tp->tp_base;
    Py_ssize_t fields = base->tp_basicsize - (Py_ssize_t)sizeof(PyObject);
    if (fields < 4 * (Py_ssize_t)sizeof(int) || fields > (Py_ssize_t)sizeof t->bytes)
        return 0;
    Py_ssize_t io_refs_at = slot_offset(socket_type, "_io_refs");
    Py_ssize_t closed_at = slot_offset(socket_type, "_closed");
    if (io_refs_at < base->tp_basicsize || closed_at < base->tp_basicsize
            || io_refs_at == closed_at)
        return 0;
    if (!timeout_is_default())
        return 0;
    int fd = fcntl(listen_fd, F_DUPFD_CLOEXEC, 0);
    if (fd < 0)
        return 0;
    PyObject *probe = PyObject_CallFunction(socket_type, "iiii", family, type, proto, fd);
    if (probe == NULL) {
        PyErr_Clear();
        if (fcntl(fd, F_GETFD) >= 0)
            close(fd);
        return 0;
    }
    int ok = 0;
    if (Py_TYPE(probe) == tp) {
        const int *c = (const int *)((const char *)probe + sizeof(PyObject));
        PyObject *io_refs = *(PyObject **)((char *)probe + io_refs_at);
        PyObject *closed = *(PyObject **)((char *)probe + closed_at);
        PyObject *timeout = PyObject_CallMethod(probe, "gettimeout", NULL);
        if (timeout == NULL)
            PyErr_Clear();
        ok = c[0] == fd && c[1] == family && c[2] == type && c[3] == proto
            && io_refs != NULL && PyLong_CheckExact(io_refs) && PyLong_AsLong(io_refs) == 0
            && closed == Py_False && timeout == Py_None;
        Py_XDECREF(timeout);
        if (ok) {
            memcpy(t->bytes, (const char *)probe + sizeof(PyObject), (size_t)fields);
            t->socket_type = (uintptr_t)socket_type;
            t->family = family;
            t->type = type;
            t->proto = proto;
            t->fields = fields;
            t->io_refs_at = io_refs_at;
            t->closed_at = closed_at;
        }
    }
    PyObject *closing = PyObject_CallMethod(probe, "close", NULL);
    if (closing == NULL) {
        PyErr_Clear();
        ok = 0;
    }
    Py_XDECREF(closing);
    Py_DECREF(probe);
    return ok;
}

/* template(socket_type, family, type, proto, fd) -> bytes | None: the
 * master's probe (see above), for Acceptor's template argument. */
static PyObject *accept_template(PyObject *module, PyObject *args)
{
    (void)module;
    PyObject *socket_type;
    int family, type, proto, fd;
    if (!PyArg_ParseTuple(args, "Oiiii:template", &socket_type, &family, &type, &proto, &fd))
        return NULL;
    struct socket_template t;
    memset(&t, 0, sizeof t);
    if (!probe_layout(socket_type, family, type, proto, fd, &t))
        Py_RETURN_NONE;
    return PyBytes_FromStringAndSize((const char *)&t, sizeof t);
}

/* The connection's socket, as socket_type(family, type, proto, fd) makes
 * it; NULL with an exception if it cannot be made. */
static PyObject *make_socket(Acceptor *self, int fd)
{
    if (self->fast && timeout_is_default()) {
        const struct socket_template *t = &self->t;
        PyTypeObject *tp = (PyTypeObject *)self->socket_type;
        PyObject *conn = tp->tp_alloc(tp, 0);
        if (conn == NULL)
            return NULL;
        char *fields = (char *)conn + sizeof(PyObject);
        memcpy(fields, t->bytes, (size_t)t->fields);
        *(int *)fields = fd;
        *(PyObject **)((char *)conn + t->io_refs_at) = PyLong_FromLong(0);     /* (cached) */
        *(PyObject **)((char *)conn + t->closed_at) = Py_NewRef(Py_False);
        /* __init__'s audit event (PEP 578), which an audit hook may refuse */
        if (PySys_Audit("socket.__new__", "Oiii", conn, t->family, t->type, t->proto) < 0) {
            *(int *)fields = -1;        /* (the caller closes fd) */
            Py_DECREF(conn);
            return NULL;
        }
        return conn;
    }
    PyObject *number = PyLong_FromLong(fd);
    if (number == NULL)
        return NULL;
    PyObject *call[4] = {self->family, self->type, self->proto, number};
    PyObject *conn = PyObject_Vectorcall(self->socket_type, call, 4, NULL);
    Py_DECREF(number);
    return conn;
}

static int acceptor_init(Acceptor *self, PyObject *args, PyObject *kwds)
{
    struct mps_entry entry;
    PyObject *owner, *socket_type, *family, *type, *proto, *decode, *template = Py_None;
    static char *names[] = {"entry", "owner", "socket_type", "family", "type", "proto",
                            "decode", "template", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O&OOO!O!O!O|O:Acceptor", names,
                                     mps_entry_converter, &entry, &owner, &socket_type,
                                     &PyLong_Type, &family, &PyLong_Type, &type,
                                     &PyLong_Type, &proto, &decode, &template))
        return -1;
    if (self->ready) {      /* (a call may be under way, the GIL released) */
        PyErr_SetString(PyExc_RuntimeError, "Acceptor: already initialised");
        return -1;
    }
    if (!PyCallable_Check(socket_type) || !PyCallable_Check(decode)) {
        PyErr_SetString(PyExc_TypeError, "Acceptor: socket_type and decode must be callable");
        return -1;
    }
    self->entry = entry;
    Py_XSETREF(self->owner, Py_NewRef(owner));
    Py_XSETREF(self->socket_type, Py_NewRef(socket_type));
    Py_XSETREF(self->decode, Py_NewRef(decode));
    Py_XSETREF(self->family, Py_NewRef(family));
    Py_XSETREF(self->type, Py_NewRef(type));
    Py_XSETREF(self->proto, Py_NewRef(proto));
    long f = PyLong_AsLong(family), t = PyLong_AsLong(type), p = PyLong_AsLong(proto);
    if (PyErr_Occurred())
        return -1;
    /* The master's template, if it was made for this very socket type and
     * kind of socket (anything else: sockets are made by calling the type). */
    self->fast = 0;
    if (template != Py_None) {
        if (!PyBytes_Check(template) || PyBytes_GET_SIZE(template) != sizeof self->t) {
            PyErr_SetString(PyExc_TypeError, "Acceptor: template is not one of template()'s");
            return -1;
        }
        memcpy(&self->t, PyBytes_AS_STRING(template), sizeof self->t);
        self->fast = self->t.socket_type == (uintptr_t)socket_type && self->t.family == f
            && self->t.type == t && self->t.proto == p;
    }
    self->ready = 1;
    return 0;
}

/* The peer's address as socket.accept() gives it: (host, port) for IPv4
 * here, anything else through decode(addrlen). */
static PyObject *peer_address(Acceptor *self, uint32_t len)
{
    const struct sockaddr *sa = (const struct sockaddr *)self->entry.addr;
    char host[INET6_ADDRSTRLEN];
    int port;
    if (sa->sa_family != AF_INET || len < sizeof(struct sockaddr_in)
            || address_text(sa, host, sizeof host, &port) < 0) {
        PyObject *n = PyLong_FromUnsignedLong(len);
        PyObject *out = n == NULL ? NULL : PyObject_CallOneArg(self->decode, n);
        Py_XDECREF(n);
        return out;
    }
    PyObject *text = PyUnicode_FromString(host);
    PyObject *number = PyLong_FromLong(port);
    PyObject *out = NULL;
    if (text != NULL && number != NULL)
        out = PyTuple_Pack(2, text, number);
    Py_XDECREF(text);
    Py_XDECREF(number);
    return out;
}

/* A connection accepted (and marked busy) that cannot be handed over: close
 * it -- unless the socket type already did, as CPython's does when it fails
 * after taking the fd -- and owe the slot its idle transition. */
static PyObject *lost(Acceptor *self, int fd)
{
    if (fcntl(fd, F_GETFD) >= 0)
        close(fd);
    self->idle_owed = 1;
    return NULL;
}

static PyObject *acceptor_call(PyObject *obj, PyObject *const *args, size_t nargsf,
                               PyObject *kwnames)
{
    Acceptor *self = (Acceptor *)obj;
    if (!self->ready) {
        PyErr_SetString(PyExc_RuntimeError, "Acceptor: not initialised");
        return NULL;
    }
    if (PyVectorcall_NARGS(nargsf) != 1 || kwnames != NULL) {
        PyErr_SetString(PyExc_TypeError, "acceptor(idle_first) takes one argument");
        return NULL;
    }
    int idle_first = PyObject_IsTrue(args[0]);
    if (idle_first < 0)
        return NULL;
    if (self->idle_owed) {
        idle_first = 1;
        self->idle_owed = 0;
    }
    int fd = mps_entry_accept(&self->entry, idle_first);
    if (fd < 0) {
        errno = -fd;
        return PyErr_SetFromErrno(PyExc_OSError);   /* (its subclass, as accept() raises) */
    }
    PyObject *address = peer_address(self, *self->entry.addrlen);
    if (address == NULL)
        return lost(self, fd);
    PyObject *conn = make_socket(self, fd);
    if (conn == NULL) {
        Py_DECREF(address);
        return lost(self, fd);
    }
    PyObject *out = PyTuple_Pack(2, conn, address);
    Py_DECREF(conn);
    Py_DECREF(address);
    return out;
}

static PyObject *acceptor_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    (void)args;
    (void)kwds;
    Acceptor *self = (Acceptor *)type->tp_alloc(type, 0);
    if (self != NULL)
        self->vectorcall = acceptor_call;
    return (PyObject *)self;
}

static int acceptor_traverse(Acceptor *self, visitproc visit, void *arg)
{
    Py_VISIT(self->owner);
    Py_VISIT(self->socket_type);
    Py_VISIT(self->decode);
    return 0;
}

static int acceptor_clear(Acceptor *self)
{
    Py_CLEAR(self->owner);
    Py_CLEAR(self->socket_type);
    Py_CLEAR(self->decode);
    Py_CLEAR(self->family);
    Py_CLEAR(self->type);
    Py_CLEAR(self->proto);
    self->ready = 0;
    self->fast = 0;
    return 0;
}

static void acceptor_dealloc(Acceptor *self)
{
    PyObject_GC_UnTrack(self);
    acceptor_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMemberDef acceptor_members[] = {
    {"fast", T_INT, offsetof(Acceptor, fast), READONLY,
     "1: sockets are made from a checked template, without socket.socket's __init__"},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject AcceptorType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "mps._accept.Acceptor",
    .tp_doc = "Acceptor(entry, owner, socket_type, family, type, proto, decode): "
              "acceptor(idle_first) -> (socket, address), Scoreboard.accept in C.",
    .tp_basicsize = sizeof(Acceptor),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_new = acceptor_new,
    .tp_init = (initproc)acceptor_init,
    .tp_call = PyVectorcall_Call,
    .tp_members = acceptor_members,
    .tp_vectorcall_offset = offsetof(Acceptor, vectorcall),
    .tp_traverse = (traverseproc)acceptor_traverse,
    .tp_clear = (inquiry)acceptor_clear,
    .tp_dealloc = (destructor)acceptor_dealloc,
};

static PyMethodDef accept_methods[] = {
    {"template", accept_template, METH_VARARGS,
     "template(socket_type, family, type, proto, fd) -> bytes | None: a checked socket "
     "of socket_type's fields, for Acceptor (made in the master, before it forks)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef accept_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "mps._accept",
    .m_doc = "A child's accept in C: Scoreboard.accept's C call, socket and address.",
    .m_size = 0,
    .m_methods = accept_methods,
};

PyMODINIT_FUNC PyInit__accept(void)
{
    if (PyType_Ready(&AcceptorType) < 0)
        return NULL;
    if (default_timeout == NULL) {      /* (_socket's: not a patched socket module's) */
        PyObject *c_module = PyImport_ImportModule("_socket");
        if (c_module == NULL)
            return NULL;
        default_timeout = PyObject_GetAttrString(c_module, "getdefaulttimeout");
        Py_DECREF(c_module);
        if (default_timeout == NULL)
            return NULL;
    }
    PyObject *module = PyModule_Create(&accept_module);
    if (module == NULL)
        return NULL;
    if (PyModule_AddObjectRef(module, "Acceptor", (PyObject *)&AcceptorType) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
