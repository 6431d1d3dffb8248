"""HTTP/1.1 for WSGI applications, below the worker.

Three small modules by responsibility (gunicorn's ``http/`` is the model):

* :mod:`.message` -- reads requests off one connection with ``httptools``
  (llhttp, strict): limits checked where they are read, one exception class
  per kind of bad input, each mapping to one status;
* :mod:`.body` -- ``wsgi.input``: the body of one request, read on demand;
* :mod:`.wsgi` -- the environ, ``start_response`` and the response, and the
  per-connection loop with its keep-alive policy.

The worker knows nothing of HTTP: it calls :class:`.wsgi.WSGIHandler` like
any ``handle(conn, addr)``.  The handler sees the pool only through
:class:`mps.pool.PoolView`: "should this connection end at the next request
boundary?" (a connection waits for a child, or this child is leaving).
"""
