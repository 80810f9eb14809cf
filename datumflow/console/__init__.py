"""The web console: a read-only view of a running datumflow in the browser, served by
`datumflow up` on 127.0.0.1 and by `datumflow console` on its own.

One static page (static/: HTML, vanilla JS, CSS, no build step) polls a JSON API (server.py) that
reads the broker and the object store through the pfs layer (views.py); the workers chart comes
from samples the console takes itself (samples.py); tokens guard it beyond loopback and guard its
one action, rerunning a job's failed datums (auth.py). See docs/console.md.
"""
